"""Merge models trained on disjoint tasks with ZipIt!: python zip.py models=<glob> [overrides]."""

import hydra

from mergelab.runner import entry, run


@hydra.main(config_path="conf", config_name="zip", version_base="1.3")
def main(cfg):
    return run(cfg)


if __name__ == "__main__":
    entry(main)
