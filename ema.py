"""The EMA study: train once, track every EMA decay and a tail average: python ema.py [overrides].

Post-hoc EMA from a finished run's snapshots, without training: python ema.py posthoc.run=<run folder>."""

import hydra

from mergelab.runner import entry, run


@hydra.main(config_path="conf", config_name="ema", version_base="1.3")
def main(cfg):
    return run(cfg)


if __name__ == "__main__":
    entry(main)
