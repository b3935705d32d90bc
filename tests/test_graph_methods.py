"""Alignment methods on derived unit graphs: for every model of the list, a model and a randomly permuted copy of it.

Weight matching recovers the permutation exactly (so the aligned copy equals the model); OT (EMD) fusion, ZipIt! and
permutation by activations merge the two into the model's own function. The methods are called through the same
entry points the scripts use (``fuse.align_all``; ZipIt!'s ``feature_stats`` / ``zip_groups`` / ``zip_states``).
"""

import copy
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from mergelab.merging import structured
from mergelab.merging.align import Permute
from mergelab.merging.features import feature_stats
from mergelab.merging.otfusion import OTFusion
from mergelab.merging.zipit import zip_groups, zip_states
from mergelab.models import TimmModel, apply_permutation, build_model, unit_graph
from mergelab.tasks.fuse import align_all
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


def merged_function(model, aligned_state, x):
    """The average of ``model`` and ``aligned_state``, evaluated on ``x``."""
    merged = copy.deepcopy(model)
    state = model.state_dict()
    merged.load_state_dict({k: (v + aligned_state[k]) / 2 if v.is_floating_point() else v for k, v in state.items()})
    return merged(x)


def align(merge, model, graph, permuted, x):
    data = SimpleNamespace(train_eval=[(x, torch.zeros(len(x)))])
    return align_all(merge, graph, [model, permuted], [model.state_dict(), permuted.state_dict()], 0, data, 0)[1]


@torch.no_grad()
def test_weight_matching_recovers_a_permuted_copy(pair):
    name, model, graph, permuted, x = pair
    aligned = align(Permute(alignment="weights"), model, graph, permuted, x)
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(aligned[key], tensor, msg=f"{name}: {key}")


# Features before the nonlinearity (where="pre"): a ReLU unit dead on the data has no features that identify it.
@pytest.mark.parametrize("merge", [Permute(alignment="activations", where="pre", num_samples=10_000),
                                   OTFusion(alignment="weights", solver="emd"),
                                   OTFusion(alignment="activations", where="pre", solver="emd",
                                            num_samples=10_000)],
                         ids=["permute-activations", "ot-weights-emd", "ot-activations-emd"])
@torch.no_grad()
def test_alignment_merges_a_permuted_copy_into_the_model(pair, merge):
    name, model, graph, permuted, x = pair
    aligned = align(merge, model, graph, permuted, x)
    torch.testing.assert_close(merged_function(model, aligned, x), model(x), rtol=1e-6, atol=1e-6, msg=name)


@torch.no_grad()
def test_zipit_merges_a_permuted_copy_into_the_model(pair):
    name, model, graph, permuted, x = pair
    stats = feature_stats([model, permuted], graph, [(x, None)], where="pre")
    states = [model.state_dict(), permuted.state_dict()]
    merged = copy.deepcopy(model)
    if graph.structured:  # heads are matched one to one (structured.zip_groups), the other groups zipped
        merged.load_state_dict(structured.zip_states(graph, states, structured.zip_groups(graph, stats, alpha=0.5,
                                                                                          beta=0.5)))
    else:
        merged.load_state_dict(zip_states(graph, states, zip_groups(stats, alpha=0.5, beta=0.5)), strict=False)
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
