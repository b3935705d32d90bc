"""Train one model with EMA weights tracked alongside: python train.py [overrides]."""

import hydra

from mergelab.runner import entry, run


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg):
    return run(cfg)


if __name__ == "__main__":
    entry(main)
