"""Every experiment file composes with the script its own command names, also at reduced size (+debug=default),
is listed in the docs; the EMA experiments run end to end on digits."""

import json
import re

import pytest
from hydra import compose, initialize_config_dir

from conftest import CONF, ROOT, make_cfg
from mergelab.runner import _run

EXPERIMENTS = sorted((ROOT / "conf" / "experiment").glob("*.yaml"))
COMMAND = re.compile(r"python (\w+)\.py\b[^\n]*\bexperiment=(\w+)")
DOC = ROOT / "docs" / "ema_tune_plots.md"


# The script of an experiment whose header documents no command of its own, by the file name's prefix.
SCRIPT_OF_PREFIX = {"ema": "ema", "soups": "soup", "soup": "soup", "fusion": "fuse", "zipit": "zip"}


def scripts_of(path):
    """The entry scripts an experiment is used with: the commands its header documents (a population may be trained
    by train.py and merged by zip.py), else the script of its name's prefix."""
    scripts = {script for script, name in COMMAND.findall(path.read_text()) if name == path.stem}
    if not scripts:
        prefix = path.stem.split("_")[0]
        assert prefix in SCRIPT_OF_PREFIX, f"{path}: document its command ('# python <script>.py experiment=...')"
        scripts = {SCRIPT_OF_PREFIX[prefix]}
    return sorted(scripts)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_experiment_composes_full_size_and_reduced(path):
    for script in scripts_of(path):
        assert (ROOT / f"{script}.py").is_file() and (ROOT / "conf" / f"{script}.yaml").is_file()
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            full = compose(script, overrides=[f"experiment={path.stem}"], return_hydra_config=True)
            small = compose(script, overrides=[f"experiment={path.stem}", "+debug=default"], return_hydra_config=True)
        assert small.dataset.name == "digits" and small.train.epochs == 1
        for key in full.hydra.sweeper.get("params") or {}:  # a swept key must exist in the config it sweeps
            assert key.split(".")[0] in full or key in full.hydra.runtime.choices, f"{path.stem} sweeps unknown {key}"


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_experiment_is_listed_in_the_docs(path):
    assert f"experiment={path.stem}" in DOC.read_text(), f"add {path.stem}'s command and expected output to {DOC}"


@pytest.mark.parametrize("name", ["ema_figure1", "ema_table2"])
def test_ema_experiments_run_at_reduced_size(tmp_path, name):
    _run(make_cfg("ema", [f"experiment={name}", "+debug=default", "model.width=0.25"], tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    assert [row["method"] for row in results["table"]] == \
        ["raw", "ema0.9", "ema0.99", "ema0.999", "ema0.9995", "ema0.9997", "tail"]
    assert all("recompute_bn_test_acc" in row for row in results["table"][1:])  # ResNet-20 has BatchNorm: both ways
    assert results["config"]["model"]["_target_"].endswith("resnet20")
