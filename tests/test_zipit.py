"""ZipIt!: the greedy matching against a textbook version, merge/unmerge matrices, self-zipping identities,
partial zipping, REPAIR, and zip.py end to end on digits tasks with its error paths."""

import copy
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from conftest import make_cfg, run_script
from mergelab.checkpoints import load_checkpoint, save_checkpoint
from mergelab.errors import UserError
from mergelab.evaluation import recompute_bn
from mergelab.merging import engine
from mergelab.merging.align import Permute, solve_assignment
from mergelab.merging.engine import Zip, merge_models, merge_states, merge_tensors, merged_layers
from mergelab.merging.features import feature_stats
from mergelab.merging.repair import channel_moments, correction_points
from mergelab.merging.zipit import within_model_budget, zip_features, zip_groups
from mergelab.models import apply_permutation, build_model, random_permutation, unit_graph
from mergelab.models.multihead import cut_points, find_cut, split_at
from mergelab.runner import _run

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"


def build(family: str, seed: int = 0, **options) -> nn.Module:
    """A float64 model with distinct per-channel BatchNorm affine terms, in eval mode.

    BatchNorm statistics are measured on random inputs and BatchNorm and linear biases are positive, so no unit is
    dead (constant) on such inputs: a dead unit has similarity 0 to every feature (as in gstoica27/ZipIt), and
    which feature it merges with is a tie.
    """
    cfg = OmegaConf.merge(OmegaConf.load(CONF / f"{family}.yaml"), options)
    torch.manual_seed(seed)
    model = build_model(cfg, 5, 1, 8).double().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.3)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_(1, 0.3)
                module.bias.uniform_(0.2, 0.8)
            elif isinstance(module, nn.Linear):
                module.bias.uniform_(0.2, 0.8)
    return recompute_bn(model, inputs(64, seed=7)).eval()


def inputs(count: int = 32, seed: int = 1) -> list:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(count, 1, 8, 8, generator=generator, dtype=torch.float64), None)]


def random_corr(size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(3 * size, size, generator=generator, dtype=torch.float64)
    return torch.corrcoef(features.T)


# ------------------------------------------------------------------------------------------------ matching


def textbook_zip(corr: torch.Tensor, num_models: int, alpha: float, beta: float) -> list[list[int]]:
    """Algorithm 1 with alpha and beta (``budget_rule="members"``) written plainly: clusters as lists, similarities
    in a dict, full search. With alpha = 0 a merged feature keeps the plain min to features of models it lacks."""
    size = corr.shape[0]
    units = size // num_models
    members = {k: [k] for k in range(size)}
    sim = {(a, b): float(corr[a, b]) for a in range(size) for b in range(a + 1, size)}
    budget = [within_model_budget(beta, units, num_models)] * num_models

    def shared(a, b):
        return {k // units for k in members[a]} & {k // units for k in members[b]}

    while len(members) > units:
        live = [(s, a, b) for (a, b), s in sim.items() if s is not None]
        allowed = [(s, a, b) for s, a, b in live if all(budget[m] > 0 for m in shared(a, b))]
        _, a, b = max(allowed or live)
        for m in shared(a, b):
            budget[m] -= 1
        members[a] += members.pop(b)
        for c in members:
            if c != a:
                sa, sb = sim[(min(a, c), max(a, c))], sim[(min(b, c), max(b, c))]
                disjoint = not {k // units for k in members[a]} & {k // units for k in members[c]}
                sim[(min(a, c), max(a, c))] = (None if sa is None or sb is None or (alpha == 0 and not disjoint)
                                               else (alpha or 1) * min(sa, sb))
        sim = {key: s for key, s in sim.items() if b not in key}
    return [sorted(members[c]) for c in sorted(members)]


def clusters(zipped: Zip) -> list[list[int]]:
    return [sorted((zipped.assign == c).nonzero().flatten().tolist()) for c in range(zipped.units)]


@pytest.mark.parametrize("num_models,alpha,beta", [(2, 0.0, 0.5), (2, 0.5, 0.0), (2, 0.5, 1.0), (2, 1.0, 0.3),
                                                   (3, 0.3, 0.5), (3, 0.8, 0.0), (4, 0.5, 0.1)])
def test_matching_equals_the_textbook_algorithm(num_models, alpha, beta):
    for seed in range(3):
        corr = random_corr(num_models * 6, seed)
        zipped = zip_features(corr, num_models, alpha=alpha, beta=beta, budget_rule="members")
        assert clusters(zipped) == textbook_zip(corr, num_models, alpha, beta)


def test_without_within_model_merges_matching_is_one_to_one():
    n = 12
    for seed in range(3):
        zipped = zip_features(random_corr(2 * n, seed), 2, alpha=0.7, beta=0.0, budget_rule="members")
        for members in clusters(zipped):
            assert len(members) == 2 and members[0] < n <= members[1]
    # Model B's features are model A's permuted, plus noise: the matching finds the permutation, as Hungarian does.
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(500, n, generator=generator, dtype=torch.float64)
    perm = torch.randperm(n, generator=generator)
    b = a[:, perm] + 0.3 * torch.randn(500, n, generator=generator, dtype=torch.float64)
    corr = torch.corrcoef(torch.cat([a, b], 1).T)
    zipped = zip_features(corr, 2, alpha=0.0, beta=0.0, budget_rule="members")
    assert torch.equal(zipped.model_assign(1), zipped.model_assign(0)[perm])  # B's unit j is A's unit perm[j]
    assert torch.equal(torch.argsort(perm), solve_assignment(corr[:n, n:]))


def test_within_model_merges_respect_the_budget():
    n = 10
    for beta in (0.2, 0.6, 1.0):
        zipped = zip_features(random_corr(2 * n, 4), 2, alpha=0.5, beta=beta, budget_rule="members")
        for i in range(2):
            # A model's within-model merges = its features minus the merged features holding any of them.
            used = n - len(torch.unique(zipped.model_assign(i)))
            assert used <= within_model_budget(beta, n, 2)


def test_merge_and_unmerge_matrices():
    n, models = 8, 3
    zipped = zip_features(random_corr(models * n, 1), models, alpha=0.5, beta=0.5)
    merge, unmerge = zipped.merge_matrix(), zipped.unmerge_matrix()
    assert merge.shape == (n, models * n) and unmerge.shape == (models * n, n)
    assert zipped.merge_matrix(1).shape == (n, n) and zipped.unmerge_matrix(2).shape == (n, n)
    assert torch.allclose(merge.sum(1), torch.ones(n, dtype=torch.float64))          # averages
    assert torch.equal(unmerge.sum(1), torch.ones(models * n, dtype=torch.float64))  # one-hot rows
    assert torch.equal(unmerge.sum(0), zipped.sizes.double())                         # column sums = sizes
    assert torch.equal(merge.sum(0) , 1 / zipped.sizes.double()[zipped.assign])
    assert torch.allclose(merge @ unmerge, torch.eye(n, dtype=torch.float64))         # merge(unmerge(z)) = z
    # The index_add path equals sum_i M_i W_i U_i with the dense matrices.
    from mergelab.models.graph import Layer, UnitGraph
    layer = Layer("fc", "linear", ("fc.weight", "fc.bias"), "g", "g", "relu")
    graph = UnitGraph({"g": n}, {"fc.weight": ("g", "g"), "fc.bias": ("g",)}, (layer,))
    states = [{"fc.weight": torch.randn(n, n, dtype=torch.float64), "fc.bias": torch.randn(n, dtype=torch.float64)}
              for _ in range(models)]
    merged = merge_states(graph, states, {"g": zipped})
    dense = sum(zipped.merge_matrix(i) @ s["fc.weight"] @ zipped.unmerge_matrix(i) for i, s in enumerate(states))
    assert torch.allclose(merged["fc.weight"], dense)
    assert torch.allclose(merged["fc.bias"], sum(zipped.merge_matrix(i) @ s["fc.bias"] for i, s in enumerate(states)))


# ------------------------------------------------------------------------------------------------ identities

FAMILIES = [("mlpnet", {"hidden": [24, 16, 12]}), ("resnet20", {"width": 0.5}), ("vgg11", {"width": 0.125})]


@pytest.mark.parametrize("family,options", FAMILIES, ids=[f for f, _ in FAMILIES])
def test_zipping_a_model_with_itself_returns_its_function(family, options):
    model = build(family, **options)
    graph = unit_graph(model)
    batches = inputs()
    x = batches[0][0]
    stats = feature_stats([model, model], graph, batches)
    cuts = cut_points(model, graph)
    for alpha, beta in ((0.5, 0.5), (0.0, 0.0)):
        zips = zip_groups(stats, alpha=alpha, beta=beta)
        for cut in (cuts[0], cuts[len(cuts) // 2], cuts[-1]):
            zipped = merge_models([model, model], graph, zips, cut)
            for output in zipped.forward_tasks(x):
                assert torch.allclose(output, model(x), atol=1e-10), (alpha, beta, cut.label)


def test_permute_baseline_recovers_a_permuted_copy():
    model = build("resnet20", width=0.5)
    graph = unit_graph(model)
    copy_ = copy.deepcopy(model)
    perms = random_permutation(graph, torch.Generator().manual_seed(3))
    copy_.load_state_dict(apply_permutation(graph, model.state_dict(), perms))
    batches = inputs()
    cut = cut_points(model, graph)[-1]
    zips = engine.match(Permute("activations"), [model, copy_], graph, batches, cut=cut)
    zipped = merge_models([model, copy_], graph, zips, cut)
    x = batches[0][0]
    for output in zipped.forward_tasks(x):
        assert torch.allclose(output, model(x), atol=1e-10)


def test_partial_zip_has_one_head_per_task_on_a_shared_trunk():
    models = [build("resnet20", seed=s, width=0.5) for s in range(3)]
    graph = unit_graph(models[0])
    batches = inputs()
    zips = zip_groups(feature_stats(models, graph, batches), alpha=0.5, beta=0.5)
    cut = find_cut(cut_points(models[0], graph), 13)
    zipped, inside = merge_models(models, graph, zips, cut), merged_layers(models[0], graph, cut)
    x = batches[0][0]
    outputs = zipped.forward_tasks(x)
    assert len(outputs) == 3 and all(o.shape == (len(x), 5) for o in outputs)
    assert zipped(x).shape == (len(x), 15)
    assert {layer.name for layer in inside} >= {"conv1", "layer2.2.conv2"} and "layer3.0.conv1" not in {
        layer.name for layer in inside}
    # One trunk: its parameters are counted once and changing them changes every head's output.
    trunk = sum(p.numel() for p in zipped.trunk.parameters())
    heads = [sum(p.numel() for p in h.parameters()) for h in zipped.heads]
    assert sum(p.numel() for p in zipped.parameters()) == trunk + sum(heads)
    assert heads[0] == sum(p.numel() for n, p in models[0].named_parameters() if n.startswith(("layer3", "fc")))
    with torch.no_grad():
        zipped.trunk.get_submodule("layer2.2.conv2").weight.mul_(1.5)
    assert all(not torch.allclose(a, b) for a, b in zip(outputs, zipped.forward_tasks(x)))
    # Each head is its model's remaining layers: fed that model's own trunk output, it gives the model's output.
    for model, head in zip(models, zipped.heads):
        own_trunk, _ = split_at(model, cut)
        unzipped = merge_models([model], graph, {g: Zip(torch.arange(n), 1, n) for g, n in graph.groups.items()},
                                cut)
        assert torch.allclose(unzipped.heads[0](own_trunk(x)), model(x))


def test_cut_points_follow_the_paper_and_stop_at_names_them():
    resnet = build("resnet20")
    cuts = cut_points(resnet, unit_graph(resnet))
    assert [c.label for c in cuts] == ["7/20", "13/20", "19/20"]
    assert find_cut(cuts, 13) == find_cut(cuts, "layer2.2.relu2") == find_cut(cuts, "layer2.2.bn2") == cuts[1]
    assert find_cut(cuts, None) == cuts[-1]
    with pytest.raises(UserError, match=r"stop_at=layer1.0.conv1 names no layer.*7 \(layer1.2.relu2\)"):
        find_cut(cuts, "layer1.0.conv1")
    mlp = build("mlpnet")
    assert [c.label for c in cut_points(mlp, unit_graph(mlp))] == ["1/4", "2/4", "3/4"]


def test_repair_gives_merged_units_the_average_statistics_of_their_members():
    models = [build("resnet20", seed=s, width=0.5) for s in range(2)]
    graph = unit_graph(models[0])
    batches = inputs(64)  # one batch: the renormalising pass sees exactly the statistics that are folded in
    zips = zip_groups(feature_stats(models, graph, batches), alpha=0.5, beta=0.5)
    cut = cut_points(models[0], graph)[-1]
    zipped, inside = merge_models(models, graph, zips, cut), merged_layers(models[0], graph, cut)
    engine.correct(zipped, "repair", models, inside, zips, batches, graph=graph)
    points = correction_points(inside)
    assert {p.kind for p in points} == {"bn"} and len(points) == sum(1 for layer in inside if layer.kind == "bn")
    names = [p.name for p in points]
    after = channel_moments(zipped.trunk, names, batches)
    parents = [channel_moments(m, names, batches) for m in models]
    for layer in points:
        zipped_group = zips[layer.out_group]
        mean = merge_tensors(zipped_group, [p[layer.name].mean for p in parents])
        std = merge_tensors(zipped_group, [p[layer.name].std for p in parents])
        assert torch.allclose(after[layer.name].mean, mean, atol=1e-6)
        assert torch.allclose(after[layer.name].std, std, atol=1e-4)


# ------------------------------------------------------------------------------------------------ zip.py

TINY = ["model=mlpnet", "model.hidden=[48,32,24]", "train.epochs=8", "train.batch_size=32"]


@pytest.fixture(scope="module")
def task_models(tmp_path_factory):
    """Two MLPs trained from different seeds on digits 0-4 and 5-9."""
    root = tmp_path_factory.mktemp("tasks")
    for seed, classes in ((0, "[0,1,2,3,4]"), (1, "[5,6,7,8,9]")):
        _run(make_cfg("train", [*TINY, f"dataset.classes={classes}", f"seed={seed}"], root / f"task{seed}"))
    return root


def test_zip_task_end_to_end(task_models, tmp_path):
    cfg = make_cfg("zip", [f"models={task_models}/task*", "merge.stop_at=[null,1]"], tmp_path)
    objective = _run(OmegaConf.merge(cfg, {"objective": "zipit+repair/val_joint_acc"}))
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {row["method"]: row for row in results["table"]}
    assert list(rows) == ["model A", "model B", "ensemble", "average", "average+repair",
                          "permute-activations", "permute-activations+repair", "zipit", "zipit+repair", "zipit@1", "zipit@1+repair"]
    assert objective == results["metrics"]["zipit+repair/val_joint_acc"]
    a, b, ensemble = rows["model A"], rows["model B"], rows["ensemble"]
    # The ensemble's heads are the models: same per-task accuracy, and the size and cost of both.
    assert ensemble["test_task0_acc"] == a["test_task0_acc"] and ensemble["test_task1_acc"] == b["test_task1_acc"]
    assert ensemble["params"] == a["params"] + b["params"] and ensemble["macs"] == a["macs"] + b["macs"]
    # A model alone predicts only its own classes: at most its share of the joint test set.
    assert a["test_task1_acc"] is None and a["test_joint_acc"] <= 52 and a["test_task0_acc"] > 85
    # Zipped: one 48-32-24 trunk and two 24->5 heads; partially zipped at 1/4: a 48-wide trunk, two 48-32-24-5 heads.
    trunk = 64 * 48 + 48 + 48 * 32 + 32 + 32 * 24 + 24
    assert rows["zipit"]["params"] == trunk + 2 * (24 * 5 + 5) and rows["zipit"]["depth"] == "3/4"
    assert rows["zipit@1"]["params"] == 64 * 48 + 48 + 2 * (48 * 32 + 32 + 32 * 24 + 24 + 24 * 5 + 5)
    assert rows["zipit@1"]["macs"] == rows["zipit@1"]["params"] - 48 - 2 * (32 + 24 + 5)
    for row in results["table"][2:]:
        assert row["test_avg_task_acc"] == pytest.approx((row["test_task0_acc"] + row["test_task1_acc"]) / 2)
        assert 0 <= row["val_joint_acc"] <= 100
    assert rows["zipit@1"]["test_avg_task_acc"] > 80
    assert list(tmp_path.glob("events.out.tfevents.*"))


def test_zip_lists_its_layers(task_models, tmp_path):
    _run(make_cfg("zip", [f"models={task_models}/task*", "list_layers=true"], tmp_path))
    table = json.loads((tmp_path / "results.json").read_text())["table"]
    assert [(r["stop_at"], r["hook"]) for r in table] == [(1, "relu1"), (2, "relu2"), (3, "relu3")]


def rewrite(path: Path, target: Path, **meta_changes) -> None:
    tensors, meta = load_checkpoint(path)
    for key, value in meta_changes.items():
        meta[key] = {**meta[key], **value} if isinstance(value, dict) else value
    save_checkpoint(target, tensors, meta)


def test_zip_refuses_bad_input(task_models, tmp_path):
    first, second = (task_models / f"task{s}" / "checkpoints" / "last.safetensors" for s in (0, 1))

    def fails(models, match, extra=()):
        with pytest.raises(UserError, match=match):
            _run(make_cfg("zip", [f"models={models}", *extra], tmp_path / "run"))

    fails(task_models / "task0", "at least 2 task models")
    fails(task_models / "task*", "stop_at=9 names no layer", ["merge.stop_at=9"])
    fails(task_models / "task*", "merge.correction", ["merge.correction=[fix]"])
    overlap = tmp_path / "overlap"
    rewrite(second, overlap / "b.safetensors", dataset={"classes": [4, 5, 6, 7, 8]})
    save_checkpoint(overlap / "a.safetensors", *load_checkpoint(first))
    fails(f"{overlap}/*.safetensors", r"tasks overlap: .* both have classes \[4\]")
    heads = tmp_path / "heads"
    rewrite(second, heads / "b.safetensors", dataset={"classes": [5, 6, 7, 8]})
    save_checkpoint(heads / "a.safetensors", *load_checkpoint(first))
    fails(f"{heads}/*.safetensors", "head has 5 outputs but its task has classes")
    family = tmp_path / "family"
    torch.manual_seed(0)
    other = build_model(OmegaConf.load(CONF / "resnet20.yaml"), 5, 1, 8)
    _, meta = load_checkpoint(second)
    save_checkpoint(family / "b.safetensors", other.state_dict(),
                    {**meta, "model": OmegaConf.to_container(OmegaConf.load(CONF / "resnet20.yaml"))})
    save_checkpoint(family / "a.safetensors", *load_checkpoint(first))
    fails(f"{family}/*.safetensors", "ZipIt! merges models of one architecture")


@pytest.mark.slow
def test_cli_error_is_one_line(task_models, tmp_path):
    proc = run_script("zip.py", f"models={task_models}/task*", "merge.stop_at=nope", f"out_dir={tmp_path}",
                      check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: stop_at=nope") and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF.parent / "experiment").glob("zipit_*.yaml")))
def test_experiment_configs_compose_for_training_and_zipping(experiment):
    for task, seed in (("a", 0), ("b", 1)):
        train = make_cfg("train", [f"experiment={experiment}", f"zipit_task={task}"])
        zipping = make_cfg("zip", [f"experiment={experiment}", f"zipit_task={task}"])
        assert train.seed == seed and train.models == zipping.models and zipping.models.endswith("/train_*")
        assert train.model == zipping.model and train.dataset.name == zipping.dataset.name
    a = make_cfg("train", [f"experiment={experiment}", "zipit_task=a"]).dataset.classes
    b = make_cfg("train", [f"experiment={experiment}", "zipit_task=b"]).dataset.classes
    assert not set(a) & set(b) and len(a) == len(b)
    assert isinstance(make_cfg("zip", [f"experiment={experiment}"]).merge.alpha, float)
