"""Alignment and fusion: identities (a model fused with a permuted copy of itself is itself), OT plans, the task."""

import json
import logging
import os
import runpy
import sys
from pathlib import Path

import numpy as np
import ot
import pytest
import torch
from filelock import FileLock
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from conftest import ROOT, make_cfg
from mergelab.errors import UserError
from mergelab.merging import engine
from mergelab.merging.align import Permute
from mergelab.merging.average import Average
from mergelab.merging.otfusion import OTFusion, solve_plan, transport_plans
from mergelab.models import apply_permutation, build_model, random_permutation, unit_graph
from mergelab.runner import _run

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"

FAMILIES = [("mlpnet", {"hidden": [24, 16, 12]}), ("mlpnet", {"hidden": [16, 12], "bias": False}),
            ("vgg11", {"width": 0.125}), ("vgg11", {"width": 0.125, "batchnorm": False, "bias": False}),
            ("resnet20", {"width": 0.5}), ("resnet20", {"width": 0.5, "batchnorm": False}),
            ("resnet18", {"width": 0.0625})]
METHODS = [Permute("weights"), Permute("activations", where="pre"), OTFusion("weights"),
           OTFusion("activations", where="pre")]


def build(family, options, seed=0):
    cfg = OmegaConf.merge(OmegaConf.load(CONF / f"{family}.yaml"), options)
    torch.manual_seed(seed)
    model = build_model(cfg, 10, 1, 8).double().eval()
    with torch.no_grad():  # distinct BatchNorm statistics, so a wrong permutation of them shows
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2)
                m.weight.normal_(1, 0.3)
    return model


def fuse(method, graph, models, x, weights=None):
    transforms = engine.match(method, models, graph, [(x, None)])
    return engine.merge_states(graph, [m.state_dict() for m in models], transforms, weights)


def relative_error(output, expected):
    """Scale-free: a deep bias-free network's logits can be tiny, so absolute tolerances would pass anything."""
    return ((output - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("family,options", FAMILIES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(FAMILIES)])
def test_fusing_a_model_with_its_permuted_copy_returns_the_model(family, options):
    model = build(family, options)
    graph = unit_graph(model)
    copy = build(family, options)
    copy.load_state_dict(apply_permutation(graph, model.state_dict(), random_permutation(
        graph, torch.Generator().manual_seed(1))))
    x = torch.randn(16, 1, 8, 8, dtype=torch.float64)
    expected = model(x)
    for method in METHODS:
        fused = build(family, options)
        fused.load_state_dict(fuse(method, graph, [model, copy], x))
        assert relative_error(fused(x), expected) < 1e-8, method.label
    # Without alignment the average of a model and its permuted copy is another function.
    fused.load_state_dict(fuse(Average(), graph, [model, copy], x))
    assert relative_error(fused(x), expected) > 1e-2


def test_fusion_of_identical_models_is_the_identity():
    model = build("resnet20", {"width": 0.5})
    graph = unit_graph(model)
    state = model.state_dict()
    for method in [Average(), Permute("weights"), OTFusion("weights")]:
        fused = fuse(method, graph, [model, model, model], torch.randn(4, 1, 8, 8, dtype=torch.float64))
        for key in state:
            torch.testing.assert_close(fused[key], state[key])


def test_ot_plan_between_a_layer_and_its_permutation_is_the_permutation():
    model = build("mlpnet", {"hidden": [30, 20]})
    graph = unit_graph(model)
    perms = random_permutation(graph, torch.Generator().manual_seed(3))
    permuted = apply_permutation(graph, model.state_dict(), perms)
    for correction in (True, False):
        plans = transport_plans(graph, model.state_dict(), permuted, rescale_plan=correction)
        for group, perm in perms.items():
            n = len(perm)
            # B's unit i is A's unit perm[i]: the plan moves all of its mass there.
            expected = torch.zeros(n, n, dtype=torch.float64)
            expected[torch.arange(n), perm] = 1.0 if correction else 1.0 / n
            torch.testing.assert_close(plans[group], expected)


def test_sinkhorn_plan_approaches_the_emd_plan_as_reg_falls():
    # 8 points: at reg=0.01 Sinkhorn already converges to within 20% of the gap at 0.3 (12 points would need
    # reg=0.003, which takes seconds of iterations).
    rng = np.random.default_rng(0)
    a_points, b_points = rng.normal(size=(8, 5)), rng.normal(size=(8, 5))
    cost = torch.from_numpy(ot.dist(b_points, a_points))
    cost = cost / cost.max()
    alpha = beta = np.full(8, 1 / 8)
    exact = solve_plan(alpha, beta, cost, solver="emd", reg=0, max_iter=0, tol=1e-9, where="test")
    gaps = [(solve_plan(alpha, beta, cost, solver="sinkhorn", reg=reg, max_iter=100_000, tol=1e-4, where="test")
             - exact).abs().sum().item() for reg in (0.3, 0.1, 0.03, 0.01)]
    assert all(later < earlier for earlier, later in zip(gaps, gaps[1:])), gaps
    assert gaps[-1] < 0.2 * gaps[0]


def test_sinkhorn_at_small_reg_converges_in_the_log_domain():
    # Costs of order 1 with reg=1e-3: exp(-M/reg) underflows to 0 in the plain algorithm (POT warns, then the plan
    # is NaN or loses its mass: a UserError); the log-domain solver meets the marginals (solve_plan checks them)
    # and is nearer the EMD plan than a larger reg.
    model = build("mlpnet", {"hidden": [16, 12]})
    other = build("mlpnet", {"hidden": [16, 12]}, seed=1)
    graph = unit_graph(model)
    options = dict(normalize="max", max_iter=20_000)
    exact = transport_plans(graph, model.state_dict(), other.state_dict(), **options)
    small, large = (transport_plans(graph, model.state_dict(), other.state_dict(), solver="sinkhorn", reg=reg,
                                    **options) for reg in (1e-3, 5e-2))
    for group, plan in exact.items():
        assert torch.isfinite(small[group]).all()
        assert (small[group] - plan).abs().sum() < (large[group] - plan).abs().sum(), group


def test_degenerate_sinkhorn_plan_is_an_error_naming_the_layer():
    model = build("mlpnet", {"hidden": [16, 12]})
    other = build("mlpnet", {"hidden": [16, 12]}, seed=1)
    graph = unit_graph(model)
    with pytest.raises(UserError, match=r"layer fc1\).*raise merge.max_iter \(now 1\)"):
        transport_plans(graph, model.state_dict(), other.state_dict(), solver="sinkhorn", reg=1e-3, max_iter=1,
                        normalize="max")


def test_unknown_ot_option_is_a_user_error():
    with pytest.raises(UserError, match="merge.solver=exact"):
        OTFusion(solver="exact")


# ------------------------------------------------------------------------------------------------- the task


# Small enough to train in seconds: 300 training images (270 fit, 30 validation), a few SGD steps per epoch.
SMALL = ["dataset.max_train_samples=300"]
TRAIN = [*SMALL, "ema.decays=[]"]


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """Three mlpnets (10 epochs of 9 steps: ~86% test accuracy, a clear loss barrier), two narrow resnet20s (1 epoch,
    for BatchNorm) and a narrower mlpnet, on 300 digits, seeds 0, 1, 2. Trained once per test session: the
    pytest-xdist workers share one folder under a file lock."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if worker else base) / "fusion_parents"  # the parent is this session's, shared by workers
    with FileLock(f"{root}.lock"):
        if not (root / "done").is_file():
            train_parents(root)
            (root / "done").touch()
    return root


def train_parents(root: Path) -> None:
    for seed in (0, 1, 2):
        _run(make_cfg("train", [*TRAIN, f"seed={seed}", "train.epochs=10", "train.batch_size=32",
                                "model.hidden=[32,16]"], root / f"mlp{seed}"))
    for seed in (0, 1):
        _run(make_cfg("train", [*TRAIN, f"seed={seed}", "train.epochs=1", "model=resnet20", "model.width=0.25",
                                "train.batch_size=128"], root / f"resnet{seed}"))
    _run(make_cfg("train", [*TRAIN, "train.epochs=1", "model.hidden=[16,16]"], root / "narrow"))


def results(folder):
    return json.loads((folder / "results.json").read_text())


def test_fuse_task_reports_every_row_barrier_and_sharpness(trained, tmp_path):
    cfg = make_cfg("fuse", [*SMALL, f"models='{trained}/mlp[01]'", "merge=ot", "retrain.epochs=1", "barrier.points=5",
                            "sharpness.enabled=true", "sharpness.num_samples=200", "sharpness.top_k=2",
                            "sharpness.power_iters=10", "sharpness.trace_samples=3", "sharpness.lanczos_steps=8",
                            "sharpness.points=5"], tmp_path)
    _run(cfg)
    out = results(tmp_path)
    methods = [r["method"] for r in out["table"]]
    assert methods == ["model 0 (mlp0)", "model 1 (mlp1)", "ensemble", "average", "ot-weights-emd",
                       "ot-weights-emd+retrain"]
    for r in out["table"]:
        assert {"val_acc", "test_acc", "val_loss", "test_loss", "time_s"} <= set(r)
    vanilla, aligned = out["barrier"]
    assert len(vanilla["alphas"]) == len(aligned["loss"]) == 5
    # The end points are the two parents, whatever the alignment (aligned B computes B's function).
    assert aligned["loss"][0] == pytest.approx(vanilla["loss"][0])
    assert aligned["loss"][-1] == pytest.approx(vanilla["loss"][-1], rel=1e-4)
    assert aligned["height"] < vanilla["height"]
    sharp = out["sharpness"]["ot-weights-emd"]
    assert len(sharp["top_eigenvalues"]) == 2 and sharp["top_eigenvalues"][0] > 0
    assert len(sharp["density"]["grid"]) == len(sharp["density"]["values"])
    assert (tmp_path / "checkpoints" / "fused.safetensors").is_file()


def test_fuse_resnet_activations_with_recompute_bn_and_three_weighted_models(trained, tmp_path):
    _run(make_cfg("fuse", [*SMALL, f"models={trained}/resnet*", "merge=permute", "merge.alignment=activations",
                           "merge.num_samples=200", "barrier.points=3"], tmp_path / "resnet"))
    methods = [r["method"] for r in results(tmp_path / "resnet")["table"]]
    assert methods[-4:] == ["average", "average+recompute_bn", "permute-activations",
                            "permute-activations+recompute_bn"]

    _run(make_cfg("fuse", [*SMALL, f"models={trained}/mlp*", "merge=permute", "weights=[2,1,1]", "barrier.points=3"],
                  tmp_path / "three"))
    out = results(tmp_path / "three")
    assert out["fusion_weights"] == [0.5, 0.25, 0.25] and len(out["models"]) == 3


def test_incompatible_models_are_a_one_line_error(trained, tmp_path):
    with pytest.raises(UserError, match="architecture"):
        _run(make_cfg("fuse", [f"models=[{trained}/mlp0,{trained}/narrow]"], tmp_path / "a"))
    with pytest.raises(UserError, match="architecture"):
        _run(make_cfg("fuse", [f"models=[{trained}/mlp0,{trained}/resnet0]"], tmp_path / "b"))


def test_fuse_script_with_one_model_exits_2_with_a_one_line_error(trained, tmp_path, monkeypatch, capsys):
    """The entry script end to end (Hydra, fuse.yaml, the runner's error path), in this process: a subprocess would
    spend seconds of CPU importing torch again."""
    monkeypatch.setattr(sys, "argv", ["fuse.py", f"models={trained}/mlp0", f"out_dir={tmp_path}",
                                      f"hydra.run.dir={tmp_path}/hydra"])
    handlers, level = logging.root.handlers[:], logging.root.level  # Hydra configures logging for its job
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(ROOT / "fuse.py"), run_name="__main__")
    finally:
        GlobalHydra.instance().clear()
        logging.root.handlers[:], logging.root.level = handlers, level
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2 and stderr.strip().count("\n") == 0 and "at least 2 models" in stderr
