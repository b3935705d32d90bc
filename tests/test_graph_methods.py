"""Alignment methods on derived unit graphs: for every model of the list, a model and a randomly permuted copy of it.

Weight matching recovers the permutation exactly (so the aligned copy equals the model); OT (EMD) fusion, ZipIt! and
permutation by activations merge the two into the model's own function. The methods go through the merge engine as
the scripts do (``engine.match``, ``engine.merge_models``; structured graphs through ``structured.match``).
"""

import copy

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from mergelab.merging import engine, structured
from mergelab.merging.align import Permute
from mergelab.merging.otfusion import OTFusion
from mergelab.merging.zipit import ZipIt
from mergelab.models import TimmModel, apply_permutation, build_model, unit_graph
from mergelab.tasks.fuse import aligned_state
from tests.test_graph import CONF
from tests.test_trace import TIMM, moving_permutation, randomise

FAMILIES = {"mlpnet": {"hidden": [12, 10, 8]}, "vgg11": {"width": 0.125}, "resnet20": {"width": 1},
            "resnet18": {"width": 0.125}}
MODELS = [f"mergelab:{name}" for name in FAMILIES] + [f"timm:{name}" for name in TIMM]


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    source, name = name.split(":")
    if source == "mergelab":
        cfg = OmegaConf.merge(OmegaConf.load(CONF / f"{name}.yaml"), FAMILIES[name])
        model, size = randomise(build_model(cfg, 10, 1, 8)), 8
    else:
        size = 16 if name == "resnet18" else 32
        model = randomise(TimmModel(num_classes=10, in_channels=1, image_size=size, name=name, kwargs=TIMM[name]))
    x = torch.randn(64 if source == "mergelab" else 32, 1, size, size, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1))
    # BatchNorm statistics of the data itself and positive biases: every unit varies over the data and few are dead,
    # so activations identify every unit (a unit constant on the data could be matched to any other).
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for module in norms:
            module.reset_running_stats()
            module.momentum = None
            module.bias.uniform_(0.2, 0.8)
        model.train()(x)
    return model.eval(), x


@pytest.fixture(scope="module", params=MODELS, ids=MODELS)
def pair(request):
    """(name, model, graph, permuted copy, inputs)."""
    model, x = build(request.param)
    graph = unit_graph(model)
    permuted = copy.deepcopy(model)
    permuted.load_state_dict(apply_permutation(graph, model.state_dict(), moving_permutation(graph, seed=7)))
    return request.param, model, graph, permuted, x


def matched(merge, model, graph, permuted, x):
    """The merge engine's transforms of ``merge`` for the model (anchor) and its permuted copy."""
    return engine.match(merge, [model, permuted], graph, [(x, torch.zeros(len(x)))], anchor=0)


@torch.no_grad()
def test_weight_matching_recovers_a_permuted_copy(pair):
    name, model, graph, permuted, x = pair
    transforms = matched(Permute(alignment="weights"), model, graph, permuted, x)
    aligned = aligned_state(graph, [model.state_dict(), permuted.state_dict()], transforms, 1)
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(aligned[key], tensor, msg=f"{name}: {key}")


class ZipItBeforeReLU(ZipIt):
    """ZipIt! on the features before the nonlinearity (the paper reads them after)."""

    features = "pre"


# Features before the nonlinearity (where="pre"): a ReLU unit dead on the data has no features that identify it.
@pytest.mark.parametrize("merge", [Permute(alignment="activations", where="pre", num_samples=None),
                                   OTFusion(alignment="weights", solver="emd"),
                                   OTFusion(alignment="activations", where="pre", solver="emd", num_samples=None),
                                   ZipItBeforeReLU(num_samples=None)],
                         ids=["permute-activations", "ot-weights-emd", "ot-activations-emd", "zipit"])
@torch.no_grad()
def test_merging_a_permuted_copy_returns_the_model(pair, merge):
    name, model, graph, permuted, x = pair
    transforms = matched(merge, model, graph, permuted, x)
    merged = engine.merge_models([model, permuted], graph, transforms)
    torch.testing.assert_close(merged(x), model(x), rtol=1e-6, atol=1e-6, msg=name)


def test_structured_assignment_is_the_best_structured_permutation():
    """Brute force over every structured permutation of two children sharing a heads group (3 heads x 2 dims):
    ``structured.assign`` reaches the maximum of sum_c <S_c, P_c>, by LAP and by EMD."""
    import itertools

    from mergelab.models import Blocks, UnitGraph, check_permutation

    graph = UnitGraph({"qk": 6, "vo": 6, "heads": 3}, {"w": ("qk", "vo")}, (),
                      {"qk": Blocks("heads", 3), "vo": Blocks("heads", 3)})
    generator = torch.Generator().manual_seed(0)
    scores = {"qk": torch.randn(6, 6, generator=generator, dtype=torch.float64),
              "vo": torch.randn(6, 6, generator=generator, dtype=torch.float64)}

    def value(perms):
        return sum(float(s[torch.arange(6), perms[g]].sum()) for g, s in scores.items())

    best = -float("inf")
    within = list(itertools.permutations(range(2)))
    for heads in itertools.permutations(range(3)):
        for qk in itertools.product(within, repeat=3):
            for vo in itertools.product(within, repeat=3):
                choice = {"heads": torch.tensor(heads), "qk": torch.zeros(6, dtype=torch.long),
                          "vo": torch.zeros(6, dtype=torch.long)}
                for group, inner in (("qk", qk), ("vo", vo)):
                    choice[group] = torch.cat([heads[h] * 2 + torch.tensor(inner[h]) for h in range(3)])
                best = max(best, value(choice))
    for solver in ("lap", "emd"):
        perms = structured.assign(graph, scores, solver=solver)
        check_permutation(graph, perms)
        assert value(perms) == pytest.approx(best)
