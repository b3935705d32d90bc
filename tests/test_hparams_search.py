"""Every search space in conf/hparams_search/ names objectives that its task really emits: one point of the space is
run through the task it is meant for, and the runner returns every objective (it refuses a name that is not a metric
of the run)."""

import math

import optuna
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import CONF, ROOT, make_cfg
from mergelab.runner import _run
from mergelab.tuning import directions_of, search_space

# The entry script each search space is for, and what it needs besides the space.
SCRIPTS = {"train": "tune", "zip": "zip", "zip_pareto": "zip", "ot": "fuse", "ties": "soup"}
SMALL_MLP = ["model=mlpnet", "model.hidden=[32,24,16]", "train.epochs=2", "train.batch_size=32"]


def test_every_search_space_is_checked_here():
    assert set(SCRIPTS) == {p.stem for p in (ROOT / "conf" / "hparams_search").glob("*.yaml")}


@pytest.fixture(scope="module")
def populations(tmp_path_factory):
    """Two MLPs on all digits (for fuse.py) and two on digits 0-4 / 5-9 (for zip.py), from different seeds."""
    root = tmp_path_factory.mktemp("populations")
    for seed in (0, 1):
        _run(make_cfg("train", [*SMALL_MLP, f"seed={seed}"], root / "all" / f"m{seed}"))
    for seed, classes in ((0, "[0,1,2,3,4]"), (1, "[5,6,7,8,9]")):
        _run(make_cfg("train", [*SMALL_MLP, f"dataset.classes={classes}", f"seed={seed}"], root / "tasks" / f"t{seed}"))
    return root


def one_point(distribution):
    """A value inside a search dimension: its first choice, its (log-)midpoint, or its lowest integer."""
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return distribution.choices[0]
    if isinstance(distribution, optuna.distributions.IntDistribution):
        return distribution.low
    low, high = distribution.low, distribution.high
    return math.sqrt(low * high) if distribution.log else (low + high) / 2


@pytest.mark.parametrize("space", sorted(SCRIPTS))
def test_search_space_objectives_are_metrics_of_its_task(space, populations, tmp_path):
    script = SCRIPTS[space]
    selection = [f"hparams_search={space}"] if script == "tune" else [f"+hparams_search={space}"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        sweeper = compose(script, overrides=selection, return_hydra_config=True).hydra.sweeper
    params = OmegaConf.to_container(sweeper.params)
    distributions, _ = search_space([f"{key}={value}" for key, value in params.items()])
    point = [f"{key}={one_point(d)}" for key, d in distributions.items()]
    inputs = {"tune": ["model=mlpnet", "train.epochs=1"], "fuse": [f"models={populations}/all/*", "barrier.points=2"],
              "zip": [f"models={populations}/tasks/*", "merge.num_samples=64"],
              "soup": [f"ingredients={populations}/all/*",
                       f"pretrained={populations}/all/m0/checkpoints/last.safetensors"]}[script]
    cfg = make_cfg(script, [*selection, *inputs, *point], tmp_path)
    values = _run(cfg)  # raises UserError when an objective is not a metric of the run
    values = [values] if isinstance(cfg.objective, str) else values
    assert len(values) == len(directions_of(sweeper.direction)) and all(math.isfinite(v) for v in values)
    for name in ([cfg.objective] if isinstance(cfg.objective, str) else cfg.objective):
        assert "test_" not in name  # selection never looks at the test split
