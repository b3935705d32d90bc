"""Fuse two or more trained models (average, permutation matching, OT fusion): python fuse.py models='<glob>' merge=ot."""

import hydra

from mergelab.runner import entry, run


@hydra.main(config_path="conf", config_name="fuse", version_base="1.3")
def main(cfg):
    return run(cfg)


if __name__ == "__main__":
    entry(main)
