"""Fine-tune one ingredient of a model-soup population: python finetune.py --multirun index='range(0,8)' [overrides]."""

import hydra

from mergelab.runner import entry, run


@hydra.main(config_path="conf", config_name="finetune", version_base="1.3")
def main(cfg):
    return run(cfg)


if __name__ == "__main__":
    entry(main)
