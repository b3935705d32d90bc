"""mergelab's ZipIt! against the original code (gstoica27/ZipIt) on the same two models, data and (alpha, beta).

The original is not part of mergelab and nothing of it is copied here: this script imports it from the folder given
with ``--original`` and runs it. Get it with

    git clone https://github.com/gstoica27/ZipIt /tmp/zipit_orig

(modules it imports only for FLOP counting and CLIP heads, ``fvcore``, ``clip`` and ``einops``, are replaced by empty
stand-ins when they are not installed; none of them is called here). Without that folder the script prints one line
and exits 0. The two task models are mergelab checkpoints (``train.py``, see docs/zipit.md); the original's
ResNet-20 is built with the same widths, the same input channels and mergelab's 1x1 projection shortcuts, and
loaded with the same weights.

Both sides read features on the same batches (each task's training images, alternating, as zip.py does), recompute
BatchNorm statistics of the merged model on them (the original's ``reset_bn_stats``; mergelab's
``recompute_bn``), and are scored by one evaluator: joint test accuracy where each head's logits go through a
softmax over its own task's classes and the most probable class over all heads is the prediction (the original's
``evaluate_logits_alltasks``; a plain argmax over the concatenated logits is printed alongside).

    python bench/zipit_original.py --original /tmp/zipit_orig --models 'outputs/zipit/digits_resnet20_x4/train_*'
        table: one row per method and depth: the original, mergelab (defaults), and mergelab with the earlier
        choices (``writers=all``, ``budget_rule=members``), test joint accuracy (%)
    ... --timing [--repeats 5]
        time of feature collection + matching of a full zip, both sides, against a plain forward pass of both
        models over the same batches (the floor), median over repeats, as ratios measured in the same run; wall
        time and this process's CPU time (steadier on a shared machine); torch and BLAS on one thread
    ... --grid
        validation joint accuracy of mergelab's ZipIt! over a small (alpha, beta) grid (choosing the defaults;
        never on test)
"""

from __future__ import annotations

import argparse
import copy
import glob
import importlib
import statistics
import sys
import time
import types
import warnings
from pathlib import Path

import torch
from omegaconf import OmegaConf
from threadpoolctl import threadpool_limits
from torch import nn

from mergelab.data import build_data
from mergelab.evaluation import recompute_bn
from mergelab.merging.align import Permute
from mergelab.merging.engine import identity_zip, merge_models
from mergelab.merging.features import feature_stats
from mergelab.merging.zipit import ZipIt, zip_features, zip_groups
from mergelab.models import unit_graph
from mergelab.models.multihead import cut_points, find_cut
from mergelab.population import load_model, resolve_checkpoints
from mergelab.tasks.zip import RoundRobin

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [(0.3, 0.125), (0.5, 0.5), (0.0001, 0.25), (0.0001, 0.075)]
DEPTHS = [7, 13, None]  # None: the full zip (every layer but the classifiers)


# ------------------------------------------------------------------------------------------------ the original


def import_original(folder: Path) -> types.SimpleNamespace:
    """The original's modules, imported from ``folder``; absent optional packages replaced by empty modules."""
    for name in ("fvcore", "fvcore.nn", "fvcore.nn.flop_count", "clip", "einops"):
        try:
            importlib.import_module(name)
        except ImportError:
            stub = types.ModuleType(name)
            stub.flop_count = None
            sys.modules[name] = stub
    sys.path.insert(0, str(folder))
    warnings.filterwarnings("ignore")  # torch.cuda.amp.autocast on CPU
    quiet = lambda iterable, *args, **kwargs: iterable  # noqa: E731  (no progress bars)
    for name in ("model_merger", "utils"):
        importlib.import_module(name).tqdm = quiet
    return types.SimpleNamespace(
        merger=importlib.import_module("model_merger"),
        matching=importlib.import_module("matching_functions"),
        metrics=importlib.import_module("metric_calculators"),
        graph=importlib.import_module("graphs.resnet_graph"),
        resnets=importlib.import_module("models.resnets"),
        utils=importlib.import_module("utils"))


def original_model(orig, model: nn.Module) -> nn.Module:
    """The original's ResNet-20 with ``model``'s widths, input channels, 1x1 shortcuts and weights."""
    state = model.state_dict()
    width = state["conv1.weight"].shape[0] / 16
    twin = orig.resnets.resnet20(w=width, num_classes=state["fc.weight"].shape[0])
    twin.conv1 = nn.Conv2d(state["conv1.weight"].shape[1], twin.conv1.out_channels, 3, padding=1, bias=False)
    for name, module in twin.named_modules():
        if name.endswith("shortcut") and len(module) > 0:
            conv = module[0]
            module[0] = nn.Conv2d(conv.in_channels, conv.out_channels, 1, stride=conv.stride, bias=False)
    renamed = {k.replace("shortcut.conv", "shortcut.0").replace("shortcut.bn", "shortcut.1").replace("fc.", "linear."): v
               for k, v in state.items()}
    twin.load_state_dict(renamed)
    return twin.eval()


def original_stop_node(orig, graph, hook: str) -> int:
    """The original's PREFIX node where mergelab's cut after ``hook`` (a stage's last ReLU) lies: the input of the
    next stage's first block, or of the pooling after the last stage."""
    stage = int(hook[len("layer")]) if hook.startswith("layer") else 0
    reader = f"layer{stage + 1}.0.conv1" if f"layer{stage + 1}.0.conv1" in graph.named_modules else "avgpool"
    for node in graph.G:
        if graph.get_node_info(node)["type"] == orig.graph.NodeType.PREFIX and any(
                graph.get_node_info(s).get("layer") == reader for s in graph.succs(node)):
            return node
    raise RuntimeError(f"no PREFIX node before {reader}")


def run_original(orig, twins, batches, method: str, hook: str, alpha: float = 0.0, beta: float = 0.0):
    """The original's merge (``ModelMerge.transform`` up to the cut), BatchNorm reset, as a callable: x -> heads."""
    graphs = [orig.graph.resnet20(copy.deepcopy(t)).graphify() for t in twins]
    merge = orig.merger.ModelMerge(*graphs, device="cpu")
    functions = {"average": orig.matching.match_tensors_identity, "permute": orig.matching.match_tensors_permute,
                 "zipit": orig.matching.match_tensors_zipit}
    merge.transform(copy.deepcopy(twins[0]), [batches], transform_fn=functions[method],
                    stop_at=original_stop_node(orig, graphs[0], hook), a=alpha, b=beta)
    orig.utils.reset_bn_stats(merge, batches)
    return merge.eval()


# ------------------------------------------------------------------------------------------------ mergelab


def load_pair(pattern: str, device: str = "cpu"):
    paths = resolve_checkpoints(glob.glob(pattern) or [pattern])
    models, tasks = [], []
    for path in paths:
        model, meta = load_model(path, device)
        models.append(model.eval())
        dataset = OmegaConf.merge(OmegaConf.load(ROOT / "conf" / "dataset" / f"{meta['dataset']['name']}.yaml"),
                                  {"classes": meta["dataset"]["classes"]})
        tasks.append(build_data(dataset, batch_size=128, eval_batch_size=1024, seed=meta["seed"], device=device))
    return paths, models, tasks


def run_mergelab(models, graph, batches, stats, method: str, cut, alpha=0.0, beta=0.0, budget_rule="original"):
    if method == "average":
        zips = {g: identity_zip(n, len(models)) for g, n in graph.groups.items()}
    elif method == "permute":
        zips = Permute("activations").match(graph, models, stats, 0)
    else:
        zips = ZipIt(alpha=alpha, beta=beta, budget_rule=budget_rule).match(graph, models, stats, 0)
    merged = merge_models(models, graph, zips, cut)
    recompute_bn(merged, batches)
    return merged.eval().forward_tasks


@torch.no_grad()
def joint_accuracy(forward, tasks, split: str = "test") -> tuple[float, float]:
    """(per-task-softmax joint accuracy, plain-argmax joint accuracy), %, over every task's ``split``."""
    classes = torch.tensor([c for task in tasks for c in task.classes])
    hits_softmax = hits_argmax = total = 0
    for task in tasks:
        original = torch.tensor(task.classes)
        for x, y in getattr(task, split):
            outputs = forward(x)
            probs = torch.cat([o.float().softmax(1) for o in outputs], 1)
            logits = torch.cat(outputs, 1)
            hits_softmax += int((classes[probs.argmax(1)] == original[y]).sum())
            hits_argmax += int((classes[logits.argmax(1)] == original[y]).sum())
            total += len(y)
    return 100 * hits_softmax / total, 100 * hits_argmax / total


# ------------------------------------------------------------------------------------------------ modes


def table(args, orig, models, tasks, batches) -> None:
    graph = unit_graph(models[0])
    cuts = cut_points(models[0], graph)
    twins = [original_model(orig, m) for m in models]
    stats = {w: feature_stats(models, graph, batches, writers=w) for w in ("last", "all")}
    rows = [("average", None, None)] + [("permute", d, None) for d in DEPTHS] + \
        [("zipit", d, s) for s in SETTINGS for d in DEPTHS]
    print("| method | depth | alpha | beta | original | mergelab writers=last | difference | mergelab default "
          "(writers=all) | mergelab writers=last budget_rule=members |")
    print("|---|---|---|---|---|---|---|---|---|")
    for method, depth, setting in rows:
        cut = find_cut(cuts, depth)
        alpha, beta = setting or (0.0, 0.0)
        original = joint_accuracy(run_original(orig, twins, batches, method, cut.hook, alpha, beta), tasks)[0]
        scores = [joint_accuracy(run_mergelab(models, graph, batches, stats[writers], method, cut, alpha, beta,
                                              rule), tasks)[0]
                  for writers, rule in (("last", "original"), ("all", "original"), ("last", "members"))
                  if method == "zipit" or rule == "original"]
        members = f"{scores[2]:.1f}" if method == "zipit" else "-"
        print(f"| {method} | {cut.label} | {alpha if setting else '-'} | {beta if setting else '-'} | {original:.1f} "
              f"| {scores[0]:.1f} | {scores[0] - original:+.1f} | {scores[1]:.1f} | {members} |", flush=True)
    wide = [copy.deepcopy(m).double() for m in models]
    exact = feature_stats(wide, graph, [(x.double(), y) for x, y in batches], writers="last")
    for alpha, beta in SETTINGS:
        single, double = (zip_groups(s, alpha=alpha, beta=beta) for s in (stats["last"], exact))
        same = sum(torch.equal(single[g].assign, double[g].assign) for g in graph.groups)
        print(f"alpha={alpha} beta={beta}: float32 features and accumulation give the float64 groupings in "
              f"{same}/{len(graph.groups)} groups")


def matching_agreement(orig) -> None:
    """mergelab's zip_features (budget_rule="original") against the original's match_tensors_zipit on random
    covariances (2 and 3 models, with a dead unit, odd widths, several (alpha, beta)): the same clusters?"""
    agree = total = 0
    for seed in range(4):
        generator = torch.Generator().manual_seed(seed)
        for models, units in ((2, 6), (2, 33), (3, 7), (3, 16)):
            features = torch.randn(3 * models * units, models * units, generator=generator, dtype=torch.float64)
            features[:, 1] = 0  # a dead unit
            cov = torch.cov(features.T, correction=0)
            std = cov.diagonal().sqrt()
            corr = cov / torch.clamp(torch.outer(std, std), min=1e-7)
            for alpha, beta in SETTINGS + [(1.0, 0.0), (0.01, 1.0)]:
                _, unmerge = orig.matching.match_tensors_zipit({"covariance": cov.clone()}, r=1 - 1 / models,
                                                               a=alpha, b=beta)
                ours = zip_features(corr, models, alpha=alpha, beta=beta).assign
                agree += torch.equal(unmerge.argmax(1), ours)
                total += 1
    print(f"matching: the same clusters as match_tensors_zipit in {agree}/{total} random cases")


def timing(args, orig, models, batches) -> None:
    graph = unit_graph(models[0])
    twins = [original_model(orig, m) for m in models]
    alpha, beta = args.alpha, args.beta
    wall = {name: [] for name in ("floor", "orig_features", "orig_matching", "features", "matching")}
    cpu = {name: [] for name in wall}  # this process's CPU time: steadier than wall time on a shared machine

    def clock():
        return time.perf_counter(), time.process_time()

    def record(name, since):
        now = clock()
        wall[name].append(now[0] - since[0])
        cpu[name].append(now[1] - since[1])
        return now

    for _ in range(args.repeats):
        start = clock()
        with torch.inference_mode():  # the cheapest plain forward: no autograd bookkeeping
            for x, _ in batches:
                for model in models:
                    model(x)
        record("floor", start)

        merge = orig.merger.ModelMerge(*[orig.graph.resnet20(copy.deepcopy(t)).graphify() for t in twins],
                                       device="cpu")
        metric_classes = {c.name: c for c in (orig.metrics.CovarianceMetric, orig.metrics.MeanMetric)}
        start = clock()
        merge.compute_metrics([batches], metric_classes=metric_classes)
        middle = record("orig_features", start)
        merge.compute_transformations(orig.matching.match_tensors_zipit, reduce_ratio=0.5, a=alpha, b=beta)
        record("orig_matching", middle)
        merge.clear_hooks()

        start = clock()
        stats = feature_stats(models, graph, batches, writers=args.writers)
        middle = record("features", start)
        zip_groups(stats, alpha=alpha, beta=beta)
        record("matching", middle)
    med = statistics.median
    images = sum(len(x) for x, _ in batches)
    print(f"{len(batches)} batches, {images} images, 2 models, alpha={alpha} beta={beta}, writers={args.writers}, "
          f"torch and BLAS threads=1, {args.repeats} repeats (median s)")
    for label, times in (("wall", wall), ("CPU", cpu)):
        theirs = [f + m for f, m in zip(times["orig_features"], times["orig_matching"])]
        ours = [f + m for f, m in zip(times["features"], times["matching"])]
        ratios = [t / o for t, o in zip(theirs, ours)]
        print(f"{label} time: floor (plain forward of both models, inference mode) {med(times['floor']):.2f} s; "
              f"original: features {med(times['orig_features']):.2f} s + matching {med(times['orig_matching']):.2f} "
              f"s = {med(theirs):.2f} s; mergelab: features {med(times['features']):.2f} s + matching "
              f"{med(times['matching']):.2f} s = {med(ours):.2f} s")
        print(f"  original / mergelab: {med(ratios):.2f} (per repeat: {' '.join(f'{r:.2f}' for r in ratios)}); "
              f"mergelab / floor: {med([o / f for o, f in zip(ours, times['floor'])]):.2f}; "
              f"original / floor: {med([t / f for t, f in zip(theirs, times['floor'])]):.2f}")


def grid(args, models, tasks, batches) -> None:
    """Validation joint accuracy (per-task softmax), mean over the depths 7/20, 13/20 and the full zip: first
    each stream reading and budget rule at two (alpha, beta), then an (alpha, beta) grid with ``--writers``."""
    graph = unit_graph(models[0])
    cuts = [find_cut(cut_points(models[0], graph), d) for d in DEPTHS]
    stats = {w: feature_stats(models, graph, batches, writers=w) for w in ("last", "all")}

    def score(method, writers, alpha=0.0, beta=0.0, rule="original"):
        return statistics.mean(joint_accuracy(run_mergelab(models, graph, batches, stats[writers], method, cut,
                                                           alpha, beta, rule), tasks, "val")[0] for cut in cuts)

    print("validation joint accuracy (%, per-task softmax), mean over depths 7/20, 13/20, 19/20")
    print("| method | writers | budget_rule | alpha | beta | val joint |")
    print("|---|---|---|---|---|---|")
    for writers in ("last", "all") if not args.grid_ab else ():
        print(f"| permute | {writers} | - | - | - | {score('permute', writers):.1f} |", flush=True)
        for rule in ("original", "members"):
            for alpha, beta in ((0.3, 0.125), (0.5, 0.5)):
                print(f"| zipit | {writers} | {rule} | {alpha} | {beta} | "
                      f"{score('zipit', writers, alpha, beta, rule):.1f} |", flush=True)
    betas = (0.0, 0.125, 0.5)
    print(f"\nZipIt!, writers={args.writers}, budget_rule=original: rows alpha, columns beta")
    print("| alpha | " + " | ".join(f"beta={b}" for b in betas) + " |")
    print("|---|" + "---|" * len(betas))
    for alpha in (0.0001, 0.3, 0.5):
        cells = [f"{score('zipit', args.writers, alpha, beta):.1f}" for beta in betas]
        print(f"| {alpha} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--original", type=Path, default=Path("/tmp/zipit_orig"), help="gstoica27/ZipIt checkout")
    parser.add_argument("--models", default="outputs/zipit/digits_resnet20_x4/train_*")
    parser.add_argument("--timing", action="store_true")
    parser.add_argument("--grid", action="store_true")
    parser.add_argument("--grid-ab", action="store_true", help="--grid's (alpha, beta) part only")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--beta", type=float, default=0.125)
    parser.add_argument("--writers", default="all", help="stream reading for --timing and --grid's (alpha, beta)")
    args = parser.parse_args()
    args.grid = args.grid or args.grid_ab
    if not args.grid and not (args.original / "matching_functions.py").is_file():
        print(f"skipped: no gstoica27/ZipIt checkout at {args.original} "
              "(git clone https://github.com/gstoica27/ZipIt /tmp/zipit_orig)")
        return
    torch.set_num_threads(1)
    threadpool_limits(1)  # scipy's BLAS (mergelab's ssyrk) on one thread too, as torch
    torch.manual_seed(0)
    paths, models, tasks = load_pair(args.models)
    batches = list(RoundRobin([task.train_eval for task in tasks]))
    print(f"models: {' '.join(map(str, paths))}; {sum(len(x) for x, _ in batches)} feature images")
    if args.grid:
        grid(args, models, tasks, batches)
        return
    orig = import_original(args.original)
    if args.timing:
        timing(args, orig, models, batches)
    else:
        matching_agreement(orig)
        table(args, orig, models, tasks, batches)


if __name__ == "__main__":
    main()
