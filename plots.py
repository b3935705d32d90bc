"""Figures from finished run folders: python plots.py kind=ema|soup|fusion|zip|barrier|sharpness|multirun runs=<glob>."""

import hydra

from mergelab.runner import entry, run


@hydra.main(config_path="conf", config_name="plots", version_base="1.3")
def main(cfg):
    return run(cfg)


if __name__ == "__main__":
    entry(main)
