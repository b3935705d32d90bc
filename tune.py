"""Optuna search over training hyperparameters on a persistent study: python tune.py --multirun [overrides]."""

import hydra

from mergelab.runner import entry, run


@hydra.main(config_path="conf", config_name="tune", version_base="1.3")
def main(cfg):
    return run(cfg)


if __name__ == "__main__":
    entry(main)
