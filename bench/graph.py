"""Unit graphs derived by tracing: how long deriving takes per model, and how long alignment takes on two trained timm
models, as ratios to baselines measured in the same run.

    python bench/graph.py [--repeats 5] [--trained outputs/graph_digits]

Derive: for each model of the list (the four built-in families at their default widths on 8x8 digits, and the timm
models of docs/graphs.md at 32x32), the median over ``--repeats`` of ``unit_graph(model)`` (``torch.export`` plus
reading its graph), with ``torch.export`` alone as the baseline, so the ratio shows what reading the graph adds.
Merge: with the checkpoints of ``bench/graph_digits.sh`` (``<trained>/<arch>/all/seed{0,1}``), the wall time of
``engine.merge`` (match, merged model) for the plain average, permutation matching and OT fusion (weights;
activations on 200 random images) and ZipIt!, each as a ratio to the plain average.
The machine is shared: read the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mergelab.merging import engine
from mergelab.merging.align import Permute
from mergelab.merging.average import Average
from mergelab.merging.otfusion import OTFusion
from mergelab.merging.zipit import ZipIt
from mergelab.models import TimmModel, build_model, unit_graph
from mergelab.population import load_model

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
TIMM = {"test_resnet": {}, "test_convnext": {}, "test_efficientnet": {}, "test_vit": {"img_size": 32, "patch_size": 4},
        "mobilenetv3_small_050": {}, "resnet18": {}}


def median_seconds(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def models():
    for family in ("mlpnet", "vgg11", "resnet20", "resnet18"):
        yield family, build_model(OmegaConf.load(CONF / f"{family}.yaml"), 10, 1, 8).eval(), 8
    for name, kwargs in TIMM.items():
        yield f"timm:{name}", TimmModel(num_classes=10, in_channels=1, image_size=32, name=name,
                                        kwargs=kwargs).eval(), 32


def derive_table(repeats: int) -> list[str]:
    lines = ["| model | parameters | torch.export (s) | unit_graph (s) | ratio |", "|---|---|---|---|---|"]
    unit_graph(build_model(OmegaConf.load(CONF / "mlpnet.yaml"), 10, 1, 8))  # warm torch.export up once
    for name, model, size in models():
        x = torch.zeros(2, 1, size, size)
        export = median_seconds(lambda: torch.export.export(model, (x,), strict=False), repeats)
        derive = median_seconds(lambda: unit_graph(model, x), repeats)
        params = sum(p.numel() for p in model.parameters())
        lines.append(f"| {name} | {params:,} | {export:.3f} | {derive:.3f} | {derive / export:.2f} |")
    return lines


def merge_table(trained: Path, repeats: int) -> list[str]:
    lines = ["| model | method | time (s) | ratio to average |", "|---|---|---|---|"]
    for arch in ("resnet", "vit"):
        paths = [trained / arch / "all" / f"seed{s}" / "checkpoints" / "last.safetensors" for s in (0, 1)]
        if not all(p.is_file() for p in paths):
            continue
        pair = [load_model(p)[0].eval() for p in paths]
        graph = unit_graph(pair[0])
        images = torch.randn(200, *pair[0].input_size, generator=torch.Generator().manual_seed(0))
        batches = [(images, None)]
        methods = {}
        for merge in (Average(), Permute(alignment="weights"), Permute(alignment="activations", num_samples=200),
                      OTFusion(alignment="weights", solver="emd"),
                      OTFusion(alignment="activations", solver="emd", num_samples=200), ZipIt(num_samples=200)):
            methods[merge.label] = lambda merge=merge: engine.merge(merge, pair, graph, batches)
        base = median_seconds(methods["average"], repeats)
        for method, function in methods.items():
            seconds = base if method == "average" else median_seconds(function, repeats)
            lines.append(f"| {pair[0].arch} | {method} | {seconds:.3f} | {seconds / base:.0f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--trained", type=Path, default=Path("outputs/graph_digits"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("\n".join(derive_table(args.repeats)))
    print()
    print("\n".join(merge_table(args.trained, args.repeats)))


if __name__ == "__main__":
    main()
