"""The merge engine: every method x correction x depth from the command-line configs, the one weight code against
the methods' own definitions, partial merges matching only their trunk, REPAIR after OT, weight matching over
parameters only, the fused checkpoint's metadata and zip.py's two joint accuracies."""

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from mergelab.data import build_data
from mergelab.errors import UserError
from mergelab.evaluation import evaluate, recompute_bn
from mergelab.merging import engine
from mergelab.merging.align import Permute, weight_matching
from mergelab.merging.otfusion import OTFusion, transport_plans
from mergelab.merging.repair import channel_moments, correction_points
from mergelab.merging.zipit import ZipIt
from mergelab.models import apply_permutation, build_model, random_permutation, unit_graph
from mergelab.models.multihead import MultiHead, cut_points, find_cut
from mergelab.population import load_model
from mergelab.runner import _run
from mergelab.tasks.zip import RoundRobin, Task, split_accuracies

from conftest import make_cfg

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
SMALL = ["dataset.max_train_samples=100", "dataset.max_test_samples=100"]
RESNET = ["model=resnet20", "model.width=0.25", "train.epochs=1", "train.batch_size=50", "ema.decays=[]"]
METHODS = [["merge=average"], ["merge=permute"], ["merge=permute", "merge.alignment=activations", "merge.num_samples=50"],
           ["merge=ot"], ["merge=ot", "merge.alignment=activations", "merge.solver=sinkhorn", "merge.normalize=max",
                          "merge.num_samples=50"], ["merge=zipit", "merge.num_samples=50"]]
LABELS = ["average", "permute-weights", "permute-activations", "ot-weights-emd", "ot-activations-sinkhorn", "zipit"]


def build(family, seed=0, **options):
    cfg = OmegaConf.merge(OmegaConf.load(CONF / f"{family}.yaml"), options)
    torch.manual_seed(seed)
    model = build_model(cfg, 10, 1, 8).double().eval()
    with torch.no_grad():  # distinct BatchNorm affine terms, so that mixing them up shows
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.normal_(1, 0.3)
                m.bias.uniform_(0.2, 0.8)
    # Statistics measured on random inputs, with positive biases: no unit is dead (constant) on such inputs, where
    # ZipIt! (as gstoica27/ZipIt) gives it similarity 0 to every feature and its merge partner is a tie.
    generator = torch.Generator().manual_seed(100 + seed)
    return recompute_bn(model, [(torch.randn(64, 1, 8, 8, generator=generator, dtype=torch.float64), None)]).eval()


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    """Two narrow BatchNorm ResNet-20s on 100 digits (one epoch), and two task models on digits 0-4 / 5-9."""
    root = tmp_path_factory.mktemp("engine")
    for seed in (0, 1):
        _run(make_cfg("train", [*SMALL, *RESNET, f"seed={seed}"], root / f"res{seed}"))
    for seed, classes in ((0, "[0,1,2,3,4]"), (1, "[5,6,7,8,9]")):
        _run(make_cfg("train", [*SMALL, *RESNET, f"seed={seed}", f"dataset.classes={classes}"], root / f"task{seed}"))
    return root


def results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


# ------------------------------------------------------------------------------------------------ every combination


@pytest.mark.parametrize("method", range(len(METHODS)), ids=LABELS)
def test_fuse_runs_every_method_with_every_correction_and_depth(parents, tmp_path, method):
    label = LABELS[method]
    for stop_at in ("null", "7"):
        out = tmp_path / f"stop{stop_at}"
        _run(make_cfg("fuse", [*SMALL, f"models={parents}/res*", *METHODS[method], f"merge.stop_at={stop_at}",
                               "merge.correction=[none,recompute_bn,repair]", "barrier.points=2"], out))
        rows = {r["method"]: r for r in results(out)["table"]}
        expected = [label, f"{label}+recompute_bn", f"{label}+repair"]
        assert list(rows)[-3:] == expected and all(0 <= rows[m]["test_acc"] <= 100 for m in expected)
        if stop_at == "null":
            # The checkpoint is the last row's model, named with its correction (a BN-reset model was once saved
            # under the plain method name).
            model, meta = load_model(out / "checkpoints" / "fused.safetensors")
            assert meta["method"] == f"{label}+repair" and meta["corrections"] == ["repair"]
            cfg = make_cfg("fuse", [*SMALL, f"models={parents}/res*"], out)  # the run's data
            test = build_data(cfg.dataset, batch_size=64, eval_batch_size=1024, seed=cfg.seed, device="cpu").test
            assert evaluate(model, test)["acc"] == pytest.approx(rows[f"{label}+repair"]["test_acc"])
        else:
            assert not (out / "checkpoints" / "fused.safetensors").exists()


@pytest.mark.parametrize("method", range(len(METHODS)), ids=LABELS)
def test_zip_runs_every_method_with_every_correction_and_depth(parents, tmp_path, method):
    label = LABELS[method]
    _run(make_cfg("zip", [*SMALL, f"models={parents}/task*", *METHODS[method], "merge.stop_at=[null,7]",
                          "zip.baselines=[]"], tmp_path))
    rows = [r["method"] for r in results(tmp_path)["table"]]
    assert rows == [f"{label}{depth}{c}" for depth in ("", "@7") for c in ("", "+recompute_bn", "+repair")]


def test_base_recompute_bn_resets_the_task_models_first(parents, tmp_path):
    cfg = make_cfg("zip", [*SMALL, f"models={parents}/task*", "zip.baselines=[models]", "merge=average",
                           "merge.correction=none", "merge.base_recompute_bn=true"], tmp_path)
    _run(cfg)
    rows = results(tmp_path)["table"]
    assert [r["method"] for r in rows] == ["model A", "model B", "average"]
    # Model A's row is model A with its statistics recomputed on the merge data (both tasks' training images).
    models, tasks = [], []
    for seed in (0, 1):
        model, meta = load_model(parents / f"task{seed}" / "checkpoints" / "last.safetensors")
        dataset = OmegaConf.merge(cfg.dataset, {"classes": meta["dataset"]["classes"]})
        data = build_data(dataset, batch_size=cfg.train.batch_size, eval_batch_size=cfg.train.eval_batch_size,
                          seed=meta["seed"], device="cpu")
        models.append(model)
        tasks.append(Task(meta["dataset"]["classes"], data))
    recompute_bn(models[0], RoundRobin([task.data.train_eval for task in tasks]))
    expected = split_accuracies(MultiHead(nn.Identity(), models[:1]), [0], tasks, "test")
    assert {k: rows[0][k] for k in expected} == expected


def test_unknown_correction_and_bad_ot_option_are_one_line_errors(parents, tmp_path):
    with pytest.raises(UserError, match=r"merge.correction=\['fix'\]"):
        _run(make_cfg("fuse", [f"models={parents}/res*", "merge.correction=[fix]"], tmp_path / "a"))
    with pytest.raises(UserError, match="merge.reg must be positive"):  # raised in instantiate, not wrapped
        _run(make_cfg("fuse", [f"models={parents}/res*", "merge=ot", "merge.solver=sinkhorn", "merge.reg=0"],
                      tmp_path / "b"))


# ------------------------------------------------------------------------------------------------ the weight code


def contract_all(state, graph, plans):
    """OT fusion's aligned model, written out: every grouped axis of every tensor contracted with its plan."""
    out = {}
    for key, tensor in state.items():
        if tensor.is_floating_point():
            for axis, group in enumerate(graph.axes[key]):
                if group is not None:
                    tensor = (tensor.movedim(axis, -1) @ plans[group]).movedim(-1, axis)
        out[key] = tensor
    return out


def test_ot_merge_is_the_weighted_average_of_the_aligned_models():
    models = [build("resnet20", seed=s, width=0.5) for s in range(3)]
    graph = unit_graph(models[0])
    states = [m.state_dict() for m in models]
    weights = [0.5, 0.3, 0.2]
    transforms = engine.match(OTFusion(), models, graph, [], anchor=1)
    merged = engine.merge_states(graph, states, transforms, weights)
    aligned = [states[1] if k == 1 else contract_all(states[k], graph, transport_plans(graph, states[1], states[k]))
               for k in range(3)]
    for key, tensor in merged.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(tensor, sum(w * a[key] for w, a in zip(weights, aligned)), rtol=1e-12,
                                       atol=1e-12)


def test_permute_merge_is_the_weighted_average_of_the_permuted_models():
    models = [build("vgg11", seed=s, width=0.125) for s in range(2)]
    graph = unit_graph(models[0])
    states = [m.state_dict() for m in models]
    transforms = engine.match(Permute("weights"), models, graph, [])
    perms = weight_matching(graph, states[0], states[1], parameters={n for n, _ in models[1].named_parameters()})
    permuted = apply_permutation(graph, states[1], perms)
    merged = engine.merge_states(graph, states, transforms, [0.25, 0.75])
    for key, tensor in merged.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(tensor, 0.25 * states[0][key] + 0.75 * permuted[key], rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------------------ depth


def test_a_partial_merge_matches_only_the_groups_it_merges():
    models = [build("resnet20", seed=s, width=0.5) for s in range(2)]
    graph = unit_graph(models[0])
    cut = find_cut(cut_points(models[0], graph), 7)
    batches = [(torch.randn(16, 1, 8, 8, dtype=torch.float64), None)]
    trunk = {layer.out_group for layer in engine.merged_layers(models[0], graph, cut)} - {None}
    assert trunk == {"conv1", *(f"layer1.{b}.conv1" for b in range(3))} and len(graph.groups) > len(trunk)
    cache = {}
    for method in (ZipIt(), Permute("weights"), OTFusion("activations")):
        assert set(engine.match(method, models, graph, batches, cut=cut, cache=cache)) == trunk, method.label
    assert all(set(stats) == trunk for stats in cache.values())  # features read on the trunk only


@pytest.mark.parametrize("method", [Permute("activations"), OTFusion("activations"), ZipIt()],
                         ids=lambda m: m.label)
def test_partial_merges_of_a_model_with_its_permuted_copy_compute_the_model(method):
    model = build("resnet20", width=0.5)
    graph = unit_graph(model)
    copy = build("resnet20", width=0.5)
    copy.load_state_dict(apply_permutation(graph, model.state_dict(),
                                           random_permutation(graph, torch.Generator().manual_seed(2))))
    batches = [(torch.randn(32, 1, 8, 8, dtype=torch.float64), None)]
    x = batches[0][0]
    for cut in [None, *cut_points(model, graph)]:
        merged = engine.merge(method, [model, copy], graph, batches, cut=cut)
        outputs = merged.forward_tasks(x) if isinstance(merged, MultiHead) else [merged(x)]
        for output in outputs:
            torch.testing.assert_close(output, model(x), rtol=1e-8, atol=1e-10)


# ------------------------------------------------------------------------------------------------ corrections


def test_repair_after_ot_gives_merged_units_the_merged_parents_statistics():
    models = [build("resnet20", seed=s, width=0.5) for s in range(2)]
    graph = unit_graph(models[0])
    batches = [(torch.randn(64, 1, 8, 8, dtype=torch.float64), None)]
    transforms = engine.match(OTFusion(), models, graph, batches)
    merged = engine.merge(OTFusion(), models, graph, batches, correction="repair")
    points = [p for p in correction_points(graph.layers) if p.out_group is not None]
    names = [p.name for p in points]
    after = channel_moments(merged, names, batches)
    parents = [channel_moments(m, names, batches) for m in models]
    for point in points:
        mean = engine.merge_tensors(transforms[point.out_group], [p[point.name].mean for p in parents])
        std = engine.merge_tensors(transforms[point.out_group], [p[point.name].std for p in parents])
        torch.testing.assert_close(after[point.name].mean, mean, atol=1e-6, rtol=0)
        torch.testing.assert_close(after[point.name].std, std, atol=1e-4, rtol=0)


def test_recompute_bn_correction_is_the_recomputed_merged_model():
    models = [build("resnet20", seed=s, width=0.5) for s in range(2)]
    graph = unit_graph(models[0])
    batches = [(torch.randn(32, 1, 8, 8, dtype=torch.float64), None)]
    corrected = engine.merge(Permute("weights"), models, graph, batches, correction="recompute_bn")
    expected = recompute_bn(engine.merge(Permute("weights"), models, graph, batches), batches)
    for key, tensor in expected.state_dict().items():
        torch.testing.assert_close(corrected.state_dict()[key], tensor)


# ------------------------------------------------------------------------------------------------ weight matching


def test_weight_matching_ignores_batchnorm_running_statistics():
    """Git Re-Basin's objective has parameters only: a BatchNorm ResNet-20 and a permuted copy with noisy weights and
    its own running statistics (large, unrelated to A's) must still be matched unit for unit."""
    model = build("resnet20", seed=0, width=0.5)
    graph = unit_graph(model)
    perms = random_permutation(graph, torch.Generator().manual_seed(1))
    copy = build("resnet20", seed=0, width=0.5)
    copy.load_state_dict(apply_permutation(graph, model.state_dict(), perms))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in copy.parameters():
            p.add_(0.1 * p.std() * torch.randn(p.shape, generator=generator, dtype=p.dtype))
        for m in copy.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 3, generator=generator)
                m.running_var.uniform_(1, 10, generator=generator)
    found = weight_matching(graph, model.state_dict(), copy.state_dict(),
                            parameters={n for n, _ in copy.named_parameters()})
    recovered = sum(int((found[g] == torch.argsort(p)).sum()) for g, p in perms.items())
    assert recovered / sum(graph.groups.values()) > 0.95


# ------------------------------------------------------------------------------------------------ zip.py's scores


class _Heads(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward_tasks(self, x):
        return [logit[x.long()] for logit in self.logits]


def test_joint_accuracy_by_argmax_and_by_per_task_softmax():
    # Two samples, two tasks of two classes. Sample 0 (class 0): head A [2, 0], head B [2.5, 2.4]: the raw argmax
    # picks B's class 2, the per-task softmax A's class 0 (0.88 > 0.52). Sample 1 (class 3): A [0, 1], B [0, 3]:
    # both pick class 3.
    logits = [torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[2.5, 2.4], [0.0, 3.0]])]
    model = _Heads(logits)
    tasks = [Task([0, 1], type("D", (), {"test": [(torch.tensor([0.0]), torch.tensor([0]))]})()),
             Task([2, 3], type("D", (), {"test": [(torch.tensor([1.0]), torch.tensor([1]))]})())]
    scores = split_accuracies(model, [0, 1], tasks, "test")
    assert scores["test_joint_acc"] == 50.0 and scores["test_joint_softmax_acc"] == 100.0
    assert scores["test_task0_acc"] == 100.0 and scores["test_task1_acc"] == 100.0

