"""plots.py: every kind renders PNGs (and TensorBoard images) from run folders; numbers match the runs exactly."""

import json
import statistics

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import make_cfg
from mergelab.checkpoints import write_json
from mergelab.errors import UserError
from mergelab.plotting import find_runs, mean_curve
from mergelab.runner import _run, run

SMALL = ["model=mlpnet", "train.epochs=2", "train.batch_size=256", "ema.decays=[0.9,0.99]"]


@pytest.fixture(scope="module")
def ema_runs(tmp_path_factory):
    """Three real ema.py runs: scheduler constant with seeds 1 and 2, cosine with seed 1."""
    root = tmp_path_factory.mktemp("ema_runs")
    for name, scheduler, seed in (("a", "constant", 1), ("b", "constant", 2), ("c", "cosine", 1)):
        _run(make_cfg("ema", [*SMALL, f"scheduler={scheduler}", f"global_seed={seed}"], root / name))
    return root


def plot(tmp_path, kind, runs, *extra):
    out = tmp_path / f"plots_{kind}"
    _run(make_cfg("plots", [f"kind={kind}", f"runs={runs}", *extra], out))
    results = json.loads((out / "results.json").read_text())
    for figure in results["figures"]:
        with open(figure, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    events = EventAccumulator(str(out))
    events.Reload()
    assert {f"plots/{name.rsplit('/', 1)[-1][:-4]}" for name in results["figures"]} <= set(events.Tags()["images"])
    return results


def test_ema_figure_and_table_aggregate_seeds_per_scheduler(tmp_path, ema_runs):
    results = plot(tmp_path, "ema", f"{ema_runs}/*")
    assert [f.rsplit("/", 1)[-1] for f in results["figures"]] == ["ema_curves.png", "ema_table.png"]
    rows = {(r["group"], r["method"]): r for r in results["table"]}
    assert {g for g, _ in rows} == {"scheduler=constant", "scheduler=cosine"}
    assert {m for _, m in rows} == {"raw", "ema0.9", "ema0.99", "tail"}
    raw = [json.loads((ema_runs / n / "results.json").read_text())["metrics"]["raw/test_acc"] for n in "ab"]
    assert rows[("scheduler=constant", "raw")]["test_acc"] == pytest.approx(statistics.fmean(raw))
    assert rows[("scheduler=constant", "raw")]["test_acc_std"] == pytest.approx(statistics.stdev(raw))
    assert rows[("scheduler=cosine", "raw")]["runs"] == 1


def test_curves_read_from_tensorboard_match_the_run_history(ema_runs):
    [single] = find_runs(str(ema_runs / "c"))
    steps, mean, std = mean_curve([single], "ema0.9/val_acc")
    history = single.results["history"]
    assert steps == [h["step"] for h in history]
    assert mean == pytest.approx([h["ema0.9/val_acc"] for h in history], abs=1e-4)  # TensorBoard stores float32
    assert std == [0.0] * len(history)


def test_multirun_and_grouped_bars_on_real_runs(tmp_path, ema_runs):
    results = plot(tmp_path, "multirun", str(ema_runs), "metrics=[raw/test_acc,tail/test_acc]")
    assert [r["group"] for r in results["table"]] == ["scheduler=constant", "scheduler=cosine"]
    assert set(results["table"][0]) == {"group", "runs", "raw/test_acc", "raw/test_acc_std", "tail/test_acc",
                                        "tail/test_acc_std"}
    bars = plot(tmp_path, "fusion", f"{ema_runs}/*")  # any run with a method table
    assert {r["method"] for r in bars["table"]} == {"raw", "ema0.9", "ema0.99", "tail"}


def write_run(folder, results):
    write_json(folder / "results.json", {"config": {"seed": 0}, "metrics": {}, **results})
    return folder


def test_soup_scatter_and_greedy_curve(tmp_path):
    ingredients = [{"path": f"m{i}", "val_acc": 80.0 + i, "test_acc": 79.0 + i, "hparams": {}} for i in range(4)]
    methods = [{"method": "uniform", "n_ingredients": 4, "val_acc": 84.0, "test_acc": 83.5, "forward_passes": 1,
                "time_s": 0.1, "selected": ["m0", "m1", "m2", "m3"]},
               {"method": "greedy", "n_ingredients": 2, "val_acc": 85.0, "test_acc": 84.0, "forward_passes": 1,
                "time_s": 0.1, "selected": ["m3", "m2"]},
               {"method": "ensemble", "n_ingredients": 4, "val_acc": 85.5, "test_acc": 84.5, "forward_passes": 4,
                "time_s": 0.2, "selected": ["m0", "m1", "m2", "m3"]}]
    curve = [{"n": 1, "val_acc": 83.0, "test_acc": 82.0}, {"n": 2, "val_acc": 85.0, "test_acc": 84.0}]
    write_run(tmp_path / "soup", {"task": "soup", "ingredients": ingredients, "methods": methods,
                                  "greedy_curve": curve, "table": methods})
    results = plot(tmp_path, "soup", str(tmp_path / "soup"))
    assert [f.rsplit("/", 1)[-1] for f in results["figures"]] == ["soup_scatter.png", "greedy_curve.png"]
    assert [r["method"] for r in results["table"]] == ["uniform", "greedy", "ensemble"]


def test_fusion_zip_barrier_and_sharpness_kinds(tmp_path):
    for seed, shift in ((0, 0.0), (1, 2.0)):
        table = [{"method": "model 0", "val_acc": 90.0 + shift, "test_acc": 89.0},
                 {"method": "ot", "val_acc": 85.0 + shift, "test_acc": 84.0}]
        barrier = [{"name": "A - B (vanilla)", "alphas": [0, 0.5, 1], "loss": [0.1, 1.2, 0.1],
                    "acc": [90, 40, 89], "height": 1.1}]
        sharpness = {"model 0": {"top_eigenvalues": [12.0, 3.0], "trace": 40.0,
                                 "density": {"grid": [-1, 0, 5, 12], "values": [0.0, 0.7, 0.2, 0.01]},
                                 "perturbation": {"alphas": [-0.1, 0, 0.1], "loss": [0.3, 0.1, 0.3]}}}
        write_run(tmp_path / "fuse" / f"seed{seed}", {"task": "fuse", "config": {"seed": seed}, "table": table,
                                                      "barrier": barrier, "sharpness": sharpness})
    bars = plot(tmp_path, "fusion", str(tmp_path / "fuse"))
    ot = next(r for r in bars["table"] if r["method"] == "ot")
    assert ot["val_acc"] == 86.0 and ot["val_acc_std"] == pytest.approx(statistics.stdev([85.0, 87.0]))
    assert ot["runs"] == 2 and ot["group"] == "all"
    assert plot(tmp_path, "zip", str(tmp_path / "fuse"))["figures"]
    heights = plot(tmp_path, "barrier", str(tmp_path / "fuse" / "seed0"))["table"]
    assert heights == [{"method": "A - B (vanilla)", "height": 1.1, "acc_at_0.5": 40}]
    sharp = plot(tmp_path, "sharpness", str(tmp_path / "fuse" / "*"))["table"]
    assert [r["top_eigenvalue"] for r in sharp] == [12.0, 12.0]


def test_missing_empty_or_wrong_runs_are_one_line_errors(tmp_path, capsys, ema_runs):
    with pytest.raises(UserError, match="no run folder matches"):
        find_runs(str(tmp_path / "nothing*"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no results.json"):
        find_runs(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="needs runs="):
        _run(make_cfg("plots", ["kind=ema"], tmp_path / "noruns"))
    with pytest.raises(UserError, match="'ingredients'"):
        _run(make_cfg("plots", ["kind=soup", f"runs={ema_runs}/*"], tmp_path / "wrong"))
    with pytest.raises(SystemExit) as exit_info:
        run(make_cfg("plots", ["kind=ema", f"runs={tmp_path}/empty"], tmp_path / "cli"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no results.json") and len(err.splitlines()) == 1
