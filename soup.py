"""Model soups of a population of checkpoints, with their baselines: python soup.py ingredients='<glob>' [overrides]."""

import hydra

from mergelab.runner import entry, run


@hydra.main(config_path="conf", config_name="soup", version_base="1.3")
def main(cfg):
    return run(cfg)


if __name__ == "__main__":
    entry(main)
