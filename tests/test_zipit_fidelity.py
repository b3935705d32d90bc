"""ZipIt! as gstoica27/ZipIt does it (issue 10, "ZipIt! against the original code"): the beta budget rule, alpha = 0
with three models, dead units, where residual streams are read, and float32 accumulation. The matching rules are
checked on small hand-built correlation matrices whose greedy merges can be followed by hand."""

import copy

import pytest
import torch

from mergelab.data import build_data
from mergelab.errors import UserError
from mergelab.merging.features import FeatureStats, _Accumulator, feature_stats
from mergelab.merging.zipit import Zip, feature_similarity, within_model_budget, zip_features, zip_groups
from mergelab.models import build_model, unit_graph


def hand_corr(size: int, entries: dict[tuple[int, int], float]) -> torch.Tensor:
    corr = torch.eye(size, dtype=torch.float64)
    for (a, b), value in entries.items():
        corr[a, b] = corr[b, a] = value
    return corr


def clusters(zipped: Zip) -> list[list[int]]:
    return [sorted((zipped.assign == c).nonzero().flatten().tolist()) for c in range(zipped.units)]


def test_original_budget_rule_charges_only_merges_whose_first_members_share_a_model():
    # A = features 0, 1; B = 2, 3. First A0+B0 (0.9). Then {A0,B0} and B1 are 0.8 apart: their first members come
    # from A and B, so the original rule does not charge it (and B's budget is 0), while "members" sees B in both
    # and refuses it, taking A1+B1 instead.
    corr = hand_corr(4, {(0, 2): 0.9, (0, 3): 0.8, (2, 3): 0.8, (1, 3): 0.1})
    assert clusters(zip_features(corr, 2, alpha=1.0, beta=0.0, budget_rule="original")) == [[0, 2, 3], [1]]
    assert clusters(zip_features(corr, 2, alpha=1.0, beta=0.0, budget_rule="members")) == [[0, 2], [1, 3]]


def test_original_budget_rule_stops_a_model_after_the_merge_that_spends_its_budget():
    # Within-model similarities dominate; at beta = 0 the original still lets each model make one within-model
    # merge (it checks the budget after charging it): A0+A1 (then A is stopped, so A2 cannot join), B0+B1, and the
    # last merge must be across models. "members" allows none at beta = 0: every merge is across models.
    within = {(0, 1): 0.9, (0, 2): 0.88, (1, 2): 0.87, (3, 4): 0.86, (3, 5): 0.85, (4, 5): 0.84}
    cross = {(a, b): 0.1 for a in range(3) for b in range(3, 6)}
    corr = hand_corr(6, {**within, **cross})
    assert clusters(zip_features(corr, 2, alpha=0.5, beta=0.0, budget_rule="original")) == [[0, 1], [2, 5], [3, 4]]
    for members in clusters(zip_features(corr, 2, alpha=0.5, beta=0.0, budget_rule="members")):
        assert len(members) == 2 and members[0] < 3 <= members[1]
    # With a budget of one, both rules allow exactly that one merge per model here.
    assert within_model_budget(2 / 3, 3, 2) == 0 and within_model_budget(1.0, 3, 2) == 1
    assert clusters(zip_features(corr, 2, alpha=0.5, beta=1.0, budget_rule="members")) == [[0, 1], [2, 5], [3, 4]]


def test_budget_uses_the_originals_floor_of_merges_per_model():
    # to_remove // num_models, then beta: 3 models of 5 units remove 10 features, 10 // 3 = 3 per model.
    assert within_model_budget(1.0, 5, 3) == 3 and within_model_budget(0.5, 5, 3) == 1
    assert within_model_budget(0.125, 64, 2) == 4 and within_model_budget(0.5, 64, 2) == 16


def test_alpha_zero_lets_a_third_models_feature_join():
    # A = 0, 1; B = 2, 3; C = 4, 5. With alpha = 0 the merged {A0, B0} takes no more A or B features, but its
    # similarity to C0 is the plain min (0.8), so C0 joins it, as in the original; likewise {A1, B1} + C1.
    corr = hand_corr(6, {(0, 2): 0.9, (0, 4): 0.8, (2, 4): 0.8, (1, 3): 0.7, (1, 5): 0.6, (3, 5): 0.6})
    for rule in ("original", "members"):
        assert clusters(zip_features(corr, 3, alpha=0.0, beta=0.0, budget_rule=rule)) == [[0, 2, 4], [1, 3, 5]]
    # When alpha = 0 leaves only pairs sharing a model (e.g. {A,B}, {A,C}, {B,C}), the most similar is taken.
    generator = torch.Generator().manual_seed(0)
    for seed in range(5):
        features = torch.randn(60, 3 * 6, generator=generator, dtype=torch.float64)
        zipped = zip_features(torch.corrcoef(features.T), 3, alpha=0.0, beta=0.0)
        assert (zipped.sizes >= 1).all() and int(zipped.sizes.sum()) == 18


def test_dead_units_have_similarity_zero_even_with_each_other():
    generator = torch.Generator().manual_seed(0)
    samples = torch.randn(200, 6, generator=generator, dtype=torch.float64)
    samples[:, 2] = 0.0  # model A's unit 2 and model B's unit 2 never fire
    samples[:, 5] = 0.0
    stats = FeatureStats(2, 3, 200, samples.sum(0), samples.T @ samples)
    similarity = feature_similarity(stats)
    assert similarity[2, 5] == 0 and (similarity[2].abs().sum() == 0) and (similarity[:, 5].abs().sum() == 0)
    live = [0, 1, 3, 4]
    torch.testing.assert_close(similarity[live][:, live], torch.corrcoef(samples[:, live].T))


def test_ties_go_to_the_first_pair_in_row_major_order():
    # All similarities equal: the original's argmax over the flattened matrix takes (0, 1) first, then (0's
    # merged feature, 2) ... with alpha = 1 (min of equal values stays equal) and an unlimited budget.
    corr = torch.full((4, 4), 0.5, dtype=torch.float64)
    assert clusters(zip_features(corr, 2, alpha=1.0, beta=1.0)) == [[0, 1, 2], [3]]


def test_float32_accumulation_is_centred():
    # Features far from zero (mean 1000, spread 1): uncentred float32 sums would lose the covariance entirely.
    generator = torch.Generator().manual_seed(0)
    features = 1000 + torch.randn(20000, 4, generator=generator, dtype=torch.float64)
    acc = _Accumulator(4, torch.device("cpu"))
    for rows in features.float().split(5000):
        acc.add([rows[:, :2], rows[:, 2:]])  # 2 models of 2 units
    stats = acc.stats(2, 2)
    exact = features.float().double()
    torch.testing.assert_close(stats.mean, exact.mean(0))
    torch.testing.assert_close(stats.cov, torch.cov(exact.T, correction=0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.outer, exact.T @ exact, rtol=1e-9, atol=0)


@pytest.fixture(scope="module")
def digits_pair():
    """Two differently initialised ResNet-20s and two batches of real digits images."""
    data = build_data({"name": "digits", "source": {"_target_": "mergelab.data.load_digits"}, "root": "data"},
                      batch_size=128, eval_batch_size=512, seed=0, device="cpu")
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(build_model({"_target_": "mergelab.models.resnet20", "width": 1}, 5, data.in_channels,
                                  data.image_size).eval())
    return models, list(data.train_eval)[:2]


def test_float32_features_give_the_float64_groupings(digits_pair):
    models, batches = digits_pair
    models = [copy.deepcopy(m) for m in models]
    graph = unit_graph(models[0])
    single = zip_groups(feature_stats(models, graph, batches, writers="last"), alpha=0.3, beta=0.125)
    wide = [m.double() for m in models]
    double = zip_groups(feature_stats(wide, graph, [(x.double(), y) for x, y in batches], writers="last"),
                        alpha=0.3, beta=0.125)
    for group in graph.groups:
        assert torch.equal(single[group].assign, double[group].assign), group


def test_writers_last_reads_a_stream_where_it_leaves_its_stage(digits_pair):
    models, batches = digits_pair
    graph = unit_graph(models[0])
    stream1 = graph.axes["conv1.weight"][0]  # stage 1's residual stream, named after the stem that writes it
    last = feature_stats(models, graph, batches, groups=[stream1, "layer1.0.conv1"], writers="last")
    every = feature_stats(models, graph, batches, groups=[stream1, "layer1.0.conv1"], writers="all")
    positions = sum(len(x) for x, _ in batches) * 8 * 8
    assert last[stream1].count == positions and every[stream1].count == 4 * positions  # stem + 3 blocks
    assert last["layer1.0.conv1"].count == every["layer1.0.conv1"].count == positions  # one writer: the same
    torch.testing.assert_close(last["layer1.0.conv1"].outer, every["layer1.0.conv1"].outer)
    captured = []
    handles = [m.get_submodule(graph.hooks[stream1][-1]).register_forward_hook(
        lambda module, i, out: captured.append(out.movedim(1, -1).reshape(-1, out.shape[1]))) for m in models]
    with torch.no_grad():
        for x, _ in batches:
            for m in models:
                m(x)
    for handle in handles:
        handle.remove()
    exit_features = torch.cat([torch.cat(captured[2 * b:2 * b + 2], 1) for b in range(len(batches))]).double()
    torch.testing.assert_close(last[stream1].mean, exit_features.mean(0), rtol=1e-5, atol=1e-6)


def test_unknown_rule_or_reading_is_a_user_error(digits_pair):
    models, batches = digits_pair
    with pytest.raises(UserError, match="budget_rule='first' is unknown"):
        zip_features(torch.eye(4, dtype=torch.float64), 2, alpha=0.5, beta=0.5, budget_rule="first")
    with pytest.raises(UserError, match="writers='exit'"):
        feature_stats(models, unit_graph(models[0]), batches, writers="exit")
