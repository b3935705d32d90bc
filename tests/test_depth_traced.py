"""Depth and REPAIR on derived unit graphs: cut points and the trunk/tail split for timm CNNs and ViTs, REPAIR on
channels-last layers and tokens, and zip.py end to end on two small ViTs trained on digits 0-4 and 5-9."""

import copy
import json

import pytest
import torch
from omegaconf import OmegaConf

from conftest import make_cfg
from mergelab.errors import UserError
from mergelab.merging import engine
from mergelab.merging.align import Permute
from mergelab.merging.average import Average
from mergelab.merging.repair import channel_moments, correction_points
from mergelab.models import TimmModel, apply_permutation, unit_graph
from mergelab.models.multihead import cut_points, find_cut, split_at
from mergelab.runner import _run
from tests.test_trace import TIMM, moving_permutation, randomise

CUT_MODELS = ["test_vit", "test_convnext", "test_efficientnet", "test_resnet"]


def timm_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = TimmModel(num_classes=10, in_channels=1, image_size=32, name=name, kwargs=TIMM[name])
    return randomise(model) if seed == 0 else model.double().eval()


def inputs(n: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", CUT_MODELS)
@torch.no_grad()
def test_every_cut_splits_the_model_into_trunk_and_tail(name):
    model = timm_model(name)
    graph = unit_graph(model)
    cuts = cut_points(model, graph)
    assert cuts and cuts[-1].depth == cuts[-1].total - 1  # the last cut is the full zip: all but the classifier
    x = inputs(4)
    for cut in cuts:
        trunk, tail = split_at(model, cut)
        torch.testing.assert_close(tail(trunk(x)), model(x), msg=f"{name} at {cut.hook}")
        inside = {n for n, _ in trunk.named_modules()}
        assert cut.hook in inside and model.classifier_name not in inside


def test_a_vit_is_cut_only_after_its_last_block():
    """Every block writes into one residual stream, so no single tensor of a partial trunk carries all it wrote:
    the only cut is after the final norm, and naming a block is refused in one line with the choices."""
    model = timm_model("test_vit")
    cuts = cut_points(model, unit_graph(model))
    assert [cut.hook for cut in cuts] == ["net.norm"]
    with pytest.raises(UserError, match=r"stop_at=net.blocks.2 names no layer .* choose one of: 15 \(net.norm\)"):
        find_cut(cuts, "net.blocks.2")


@pytest.fixture(scope="module", params=["test_vit", "test_convnext"])
def repaired_pair(request):
    model = timm_model(request.param)
    graph = unit_graph(model)
    permuted = copy.deepcopy(model)
    permuted.load_state_dict(apply_permutation(graph, model.state_dict(), moving_permutation(graph, seed=7)))
    return request.param, model, graph, permuted


@torch.no_grad()
def test_repair_of_a_model_merged_with_its_permuted_copy_is_the_model(repaired_pair):
    name, model, graph, permuted = repaired_pair
    x = inputs()
    batches = [(x, torch.zeros(len(x)))]
    merged = engine.merge(Permute(alignment="weights"), [model, permuted], graph, batches, correction="repair")
    # Not to 1e-6: REPAIR's eps (1e-8 added to every variance) moves units of small variance by ~1e-5.
    torch.testing.assert_close(merged(x), model(x), rtol=1e-4, atol=1e-4, msg=name)
    points = correction_points(graph.layers)
    # Channels-last and token layers are corrected on their last axis (not dim 1, which indexes tokens/rows).
    assert any(graph.feature_dim(p.name) != 1 for p in points)
    if name == "test_vit":  # pre-norm: the stream writers are points of their own, not folded into the next norm
        assert {"net.patch_embed.proj", "net.blocks.0.attn.proj", "net.blocks.0.mlp.fc2"} <= {p.name for p in points}


@pytest.mark.parametrize("name", ["test_vit", "test_convnext"])
@torch.no_grad()
def test_repair_gives_merged_units_their_members_average_statistics(name):
    """Two different models averaged, then REPAIR: each correction point of the merge has the average of the
    parents' per-channel mean and std, measured on the channel axis of its own output (one batch, so the
    renormalising pass sees exactly the statistics that are folded in)."""
    models = [timm_model(name, seed) for seed in (0, 1)]
    graph = unit_graph(models[0])
    x = inputs(16)
    batches = [(x, torch.zeros(len(x)))]
    transforms = engine.match(Average(), models, graph, batches)
    merged = engine.correct(engine.merge_models(models, graph, transforms), "repair", models, list(graph.layers),
                            transforms, batches, graph=graph)
    points = [p for p in correction_points(graph.layers) if p.out_group in transforms]
    names = [p.name for p in points]
    dims = {n: graph.feature_dim(n) for n in names}
    after = channel_moments(merged, names, batches, dims)
    parents = [channel_moments(m, names, batches, dims) for m in models]
    for point in points:
        mean = (parents[0][point.name].mean + parents[1][point.name].mean) / 2
        std = (parents[0][point.name].std + parents[1][point.name].std) / 2
        torch.testing.assert_close(after[point.name].mean, mean, atol=1e-6, rtol=1e-6, msg=point.name)
        # REPAIR's eps (1e-8 added to every variance) counts where the average's own variance is small (ConvNeXt's
        # last stage: 1x1 maps, 16 samples): up to ~0.5%. A wrong channel axis is off by far more, or fails.
        torch.testing.assert_close(after[point.name].std, std, atol=1e-4, rtol=1e-2, msg=point.name)


# ------------------------------------------------------------------------------------------------ zip.py on ViTs

VIT = ["model=timm", "model.name=test_vit", "+model.kwargs={img_size: 32, patch_size: 4}", "dataset.image_size=32",
       "train.epochs=2", "train.batch_size=64"]


@pytest.fixture(scope="module")
def vit_tasks(tmp_path_factory):
    """Two test_vit trained briefly (barely past chance: this checks the pipeline, not the accuracy; the docs' table
    has trained ones) from different seeds on digits 0-4 and 5-9."""
    root = tmp_path_factory.mktemp("vit_tasks")
    for seed, classes in ((0, "[0,1,2,3,4]"), (1, "[5,6,7,8,9]")):
        _run(make_cfg("train", [*VIT, f"dataset.classes={classes}", f"seed={seed}"], root / f"task{seed}"))
    return root


def test_zip_merges_two_vits_with_every_correction(vit_tasks, tmp_path):
    _run(make_cfg("zip", [f"models={vit_tasks}/task*", "dataset.image_size=32", "merge.num_samples=128",
                          "zip.baselines=[models,average]", "merge.correction=[none,recompute_bn,repair]"], tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {row["method"]: row for row in results["table"]}
    # A ViT has no BatchNorm: no +recompute_bn rows.
    assert list(rows) == ["model A", "model B", "average", "average+repair", "zipit", "zipit+repair"]
    assert results["cuts"][-1]["hook"] == "net.norm" and rows["zipit"]["depth"] == results["cuts"][-1]["depth"]
    # One merged trunk (all but the classifiers) and two 64->5 heads.
    head = 64 * 5 + 5
    assert rows["zipit"]["params"] == rows["zipit+repair"]["params"] == rows["model A"]["params"] + head
    assert results["merged_features"]  # ZipIt! zipped the trunk's groups
    for row in results["table"][2:]:
        assert 0 <= row["test_joint_acc"] <= 100
        assert row["test_avg_task_acc"] == pytest.approx((row["test_task0_acc"] + row["test_task1_acc"]) / 2)
