"""Feature statistics and permutation matching (by weights and by activations)."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mergelab.merging import features as features_module
from mergelab.merging.features import as_samples, feature_stats
from mergelab.models import build_model, unit_graph

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"


def build(family: str, seed: int, **options):
    cfg = OmegaConf.merge(OmegaConf.load(CONF / f"{family}.yaml"), options)
    torch.manual_seed(seed)
    return build_model(cfg, 10, 1, 8).double().eval()


def direct_moments(feature_list: list[torch.Tensor]):
    """count, mean, covariance, correlation of stored (samples, units) matrices, computed the textbook way."""
    f = torch.cat(feature_list)
    centred = f - f.mean(0)
    cov = centred.T @ centred / len(f)
    std = cov.diagonal().sqrt()
    return len(f), f.mean(0), cov, cov / torch.outer(std, std), f


def mlp_features(model, x, where):
    h = x.flatten(1)
    out = {}
    for i in range(1, model.depth + 1):
        pre = getattr(model, f"fc{i}")(h)
        h = torch.relu(pre)
        out[f"fc{i}"] = [pre if where == "pre" else h]
    return out


def resnet_stream1_features(model, x, where):
    """Every write into stage 1's residual stream, recomputed module by module (no hooks)."""
    pre = model.bn1(model.conv1(x))
    writes, h = [pre], torch.relu(pre)
    for block in model.layer1:
        pre = block.bn2(block.conv2(block.relu1(block.bn1(block.conv1(h))))) + block.shortcut(h)
        h = torch.relu(pre)
        writes.append(pre)
    return [w if where == "pre" else torch.relu(w) for w in writes]


@pytest.mark.parametrize("where", ["pre", "post"])
def test_feature_stats_match_stored_features(where, monkeypatch):
    monkeypatch.setattr(features_module, "CHUNK_ROWS", 1000)  # exercise the chunked accumulation
    torch.manual_seed(0)
    batches = [(torch.randn(20, 1, 8, 8, dtype=torch.float64), None) for _ in range(3)]

    mlps = [build("mlpnet", seed, hidden=[12, 10]) for seed in (0, 1, 2)]
    stats = feature_stats(mlps, unit_graph(mlps[0]), batches, where=where)
    for group in ("fc1", "fc2"):
        stored = [torch.cat([mlp_features(m, x, where)[group][0] for m in mlps], 1) for x, _ in batches]
        count, mean, cov, corr, f = direct_moments(stored)
        s = stats[group]
        assert s.count == count == 60 and s.num_models == 3 and s.units == {"fc1": 12, "fc2": 10}[group]
        torch.testing.assert_close(s.mean, mean)
        torch.testing.assert_close(s.cov, cov)
        torch.testing.assert_close(s.corr(eps=0), corr, equal_nan=True)  # dead units: 0/0
        torch.testing.assert_close(s.block(1, 2, s.corr(eps=0)), corr[s.units:2 * s.units, 2 * s.units:], equal_nan=True)
        # OT's activation ground metric from the second moments equals the explicit pairwise distances.
        a, b = f[:, :s.units], f[:, s.units:2 * s.units]
        torch.testing.assert_close(s.sq_distances(0, 1), torch.cdist(a.T, b.T).square())

    resnets = [build("resnet20", seed) for seed in (0, 1)]
    for m in resnets:
        for module in m.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.3)
    graph = unit_graph(resnets[0])
    stream1 = graph.axes["conv1.weight"][0]  # stage 1's residual stream, named after the stem that writes it
    stats = feature_stats(resnets, graph, batches, groups=[stream1], where=where, num_batches=2)
    assert set(stats) == {stream1}
    stored = []
    for x, _ in batches[:2]:
        per_model = [resnet_stream1_features(m, x, where) for m in resnets]
        stored += [torch.cat([as_samples(w) for w in writer], 1) for writer in zip(*per_model)]
    count, mean, cov, corr, _ = direct_moments(stored)
    assert stats[stream1].count == count == 2 * 20 * 64 * 4  # 2 batches, 8x8 positions, 4 writers
    torch.testing.assert_close(stats[stream1].mean, mean)
    torch.testing.assert_close(stats[stream1].cov, cov)
    torch.testing.assert_close(stats[stream1].corr(eps=0), corr, equal_nan=True)


def test_feature_stats_restore_training_mode_and_hooks():
    models = [build("mlpnet", 0, hidden=[6]).train(), build("mlpnet", 1, hidden=[6]).eval()]
    feature_stats(models, unit_graph(models[0]), [(torch.randn(5, 1, 8, 8, dtype=torch.float64), None)])
    assert models[0].training and not models[1].training
    assert not any(m._forward_hooks for model in models for m in model.modules())


def test_dead_units_have_zero_correlation():
    model = build("mlpnet", 0, hidden=[6])
    with torch.no_grad():
        model.fc1.weight[2] = 0
        model.fc1.bias[2] = -1  # unit 2 is always 0 after the ReLU
    stats = feature_stats([model], unit_graph(model), [(torch.randn(30, 1, 8, 8, dtype=torch.float64), None)])
    corr = stats["fc1"].corr()
    assert torch.isfinite(corr).all() and corr[2].abs().max() == 0
