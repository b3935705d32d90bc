"""Task-vector merging: each method against a hand computation on small tensors, and identities."""

import math

import pytest
import torch

from mergelab.merging import task_vectors as tv


def test_task_arithmetic_adds_scaled_task_vectors():
    base = torch.tensor([1.0, 2.0])
    tuned = [torch.tensor([2.0, 2.0]), torch.tensor([1.0, 0.0])]  # tau = [1, 0] and [0, -2]
    torch.testing.assert_close(tv.task_arithmetic(base, tuned, 0.5), torch.tensor([1.5, 1.0]))


def test_ties_trims_elects_the_sign_of_the_mass_and_takes_the_disjoint_mean():
    base = torch.zeros(4)
    tau1 = torch.tensor([3.0, -2.0, 0.5, 1.0])
    tau2 = torch.tensor([-1.0, -4.0, 0.2, 2.0])
    # k = 0.5 keeps two entries each: [3, -2, 0, 0] and [0, -4, 0, 2]; mass [3, -6, 0, 2] elects [+, -, 0, +];
    # the agreeing entries average to [3, (-2 - 4) / 2, nothing, 2].
    assert tv.trim(tau1, 0.5).tolist() == [3.0, -2.0, 0.0, 0.0]
    torch.testing.assert_close(tv.ties(base, [tau1, tau2], k=0.5, lam=1.0), torch.tensor([3.0, -3.0, 0.0, 2.0]))
    # Without trimming the minority (-1 at entry 0) is outvoted by the mass, not by the count.
    torch.testing.assert_close(tv.ties(base, [tau1, tau2], k=1.0, lam=2.0),
                               2 * torch.tensor([3.0, -3.0, 0.35, 1.5]))


def test_dare_rescaling_keeps_the_expected_task_vector():
    base = torch.full((200_000,), 0.5)
    tau = torch.linspace(-1, 1, 200_000)
    merged = tv.dare(base, [base + tau], p=0.7, lam=1.0, seed=3, key="w")
    delta = merged - base
    kept = delta != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01  # about 1 - p survive
    torch.testing.assert_close(delta[kept], tau[kept] / 0.3)  # survivors rescaled by 1 / (1 - p)
    # E[mask * tau / (1 - p)] = tau: each column holds one tau in 4000 independent entries; their means are tau
    # within 5 standard errors (|tau| sqrt(p / (1 - p) / 4000) <= 0.024).
    column = torch.linspace(-1, 1, 20).expand(4000, 20)
    means = tv.dare(torch.zeros(4000, 20), [column], p=0.7, lam=1.0, seed=5, key="v").mean(0)
    assert (means - column[0]).abs().max() < 0.12
    assert tv.dare(base, [base + tau], p=0.7, lam=1.0, seed=3, key="w").equal(merged)  # seeded per (seed, key)


def test_dare_ties_elects_signs_over_the_rescaled_vectors():
    base = torch.zeros(3)
    tuned = [torch.tensor([1.0, -1.0, 2.0]), torch.tensor([-3.0, -1.0, 2.0])]
    # p = 0 drops nothing: plain sign election and disjoint mean.
    torch.testing.assert_close(tv.dare(base, tuned, p=0.0, lam=1.0, combine="ties"), torch.tensor([-3.0, -1.0, 2.0]))


def test_model_stock_ratio_from_the_angle():
    base = torch.zeros(2)
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    cos = 1 / math.sqrt(2)
    t = 2 * cos / (1 + cos)
    torch.testing.assert_close(tv.model_stock(base, [a, b]), t * (a + b) / 2)
    # Orthogonal task vectors: t = 0, the pretrained weights; identical ones: t = 1, their average.
    torch.testing.assert_close(tv.model_stock(base + 1, [base + torch.tensor([2.0, 1.0]), base + torch.tensor([1.0, 2.0])]),
                               base + 1)
    assert tv.stock_ratio(1.0, 5) == 1.0 and tv.stock_ratio(0.0, 5) == 0.0


def test_mean_pairwise_cosine_is_the_mean_over_pairs():
    torch.manual_seed(0)
    base, tuned = torch.randn(7), [torch.randn(7) for _ in range(4)]
    taus = [t - base for t in tuned]
    pairs = [torch.nn.functional.cosine_similarity(taus[i], taus[j], dim=0)
             for i in range(4) for j in range(4) if i != j]
    torch.testing.assert_close(tv.mean_pairwise_cosine(base, tuned), torch.stack(pairs).mean(), atol=1e-6, rtol=0)


def test_slerp_endpoints_and_midpoint():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    torch.testing.assert_close(tv.slerp(a, b, 0.0), a)
    torch.testing.assert_close(tv.slerp(a, b, 1.0), b)
    # Halfway along a right angle: sin(pi/4)/sin(pi/2) of each.
    torch.testing.assert_close(tv.slerp(a, b, 0.5), (a + b) * math.sin(math.pi / 4))
    torch.testing.assert_close(tv.slerp(a, 3 * a, 0.25), 1.5 * a)  # parallel: linear


def test_fisher_merge_weights_each_entry_by_its_fisher():
    tuned = [torch.tensor([0.0, 4.0]), torch.tensor([2.0, 0.0])]
    fishers = [torch.tensor([1.0, 3.0]), torch.tensor([3.0, 1.0])]
    torch.testing.assert_close(tv.fisher_merge(tuned, fishers, floor=0.0), torch.tensor([1.5, 3.0]))


def test_regmean_is_the_least_squares_merge_of_one_linear_layer():
    torch.manual_seed(0)
    xs = [torch.randn(50, 6, dtype=torch.float64), torch.randn(30, 6, dtype=torch.float64)]
    ws = [torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)]
    merged = tv.regmean(ws, [x.T @ x for x in xs], alpha=1.0)
    # argmin_W sum_i |X_i W^T - X_i W_i^T|^2: one least-squares problem over the stacked inputs.
    lstsq = torch.linalg.lstsq(torch.cat(xs), torch.cat([x @ w.T for x, w in zip(xs, ws)])).solution.T
    torch.testing.assert_close(merged, lstsq)
    # alpha = 0 keeps only the diagonal: a per-input-feature weighted average.
    diag = [torch.diagonal(x.T @ x) for x in xs]
    expected = (ws[0] * diag[0] + ws[1] * diag[1]) / (diag[0] + diag[1])
    torch.testing.assert_close(tv.regmean(ws, [x.T @ x for x in xs], alpha=0.0), expected)


def test_merging_identical_task_vectors_returns_that_fine_tuned_model():
    torch.manual_seed(1)
    base = torch.randn(5, 3)
    tuned = base + torch.randn(5, 3)
    n = 3
    same = [tuned] * n
    torch.testing.assert_close(tv.task_arithmetic(base, same, 1 / n), tuned)
    torch.testing.assert_close(tv.ties(base, same, k=1.0, lam=1.0), tuned)
    torch.testing.assert_close(tv.dare(base, same, p=0.0, lam=1 / n), tuned)
    torch.testing.assert_close(tv.dare(base, same, p=0.0, lam=1.0, combine="ties"), tuned)
    torch.testing.assert_close(tv.model_stock(base, same), tuned)
    torch.testing.assert_close(tv.slerp(tuned, tuned, 0.3), tuned)
    torch.testing.assert_close(tv.fisher_merge(same, [torch.rand(5, 3)] * n), tuned)
    x = torch.randn(20, 3)
    torch.testing.assert_close(tv.regmean(same, [x.T @ x] * n, alpha=0.5), tuned)
    torch.testing.assert_close(tv.mean(same), tuned)


def test_merge_state_reads_one_tensor_at_a_time():
    states = [{"a": torch.full((2,), float(i)), "n": torch.tensor(7)} for i in range(4)]
    reads = []

    def read(i, key):
        reads.append((i, key))
        return states[i][key]

    merged = tv.merge_state(["a", "n"], read, 4, lambda key, tuned: tv.mean(tuned))
    torch.testing.assert_close(merged["a"], torch.full((2,), 1.5))
    assert merged["n"] == 7
    assert [k for _, k in reads] == sorted(k for _, k in reads)  # key by key: all of "a" before any of "n"


def test_invalid_hyperparameters_are_refused():
    with pytest.raises(ValueError):
        tv.trim(torch.ones(3), 0.0)
    with pytest.raises(ValueError):
        tv.dare(torch.ones(3), [torch.ones(3)], p=1.0, lam=1.0)


def peak_live_reads(method, n, params=None):
    """The most tensors read by a streamed merge of ``n`` models that are alive at once (freed ones excluded)."""
    import weakref

    torch.manual_seed(0)
    keys = [f"layer{i}" for i in range(4)]
    base = {k: torch.randn(64) for k in keys}
    live = peak = 0

    def read(i, key):
        nonlocal live, peak
        tensor = base[key] + 0.1 * torch.randn(64)
        live += 1
        peak = max(peak, live)

        def freed():
            nonlocal live
            live -= 1

        weakref.finalize(tensor, freed)
        return tensor

    merger = (lambda key, tuned: tv.mean(tuned)) if method == "uniform" else \
        tv.key_merger(method, params or {}, base=base.__getitem__)
    tv.merge_state(keys, read, n, merger)
    return peak


@pytest.mark.parametrize("method, params", [("uniform", None), ("task_arithmetic", {"lam": 0.5}),
                                            ("ties", {"k": 0.2, "lam": 1.0}), ("dare", {"p": 0.5, "lam": 1.0}),
                                            ("model_stock", None)])
def test_streaming_holds_a_bounded_number_of_tensors_whatever_the_population(method, params):
    few, many = peak_live_reads(method, 3, params), peak_live_reads(method, 24, params)
    assert few == many <= 3  # the first model's tensor of the key, plus the one being added


def test_fisher_diagonal_of_a_softmax_regression_by_hand():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4, bias=False)
    x = torch.randn(10, 3)
    fisher = tv.fisher_diagonal(model, [(x[:6], None), (x[6:], None)], num_examples=10)
    # d log p_c / dW = (e_c - p) x^T, so F = mean_x sum_c p_c ((e_c - p) x^T)^2.
    p = torch.softmax(x @ model.weight.detach().T, -1)
    expected = torch.zeros(4, 3)
    for n in range(10):
        for c in range(4):
            e = torch.nn.functional.one_hot(torch.tensor(c), 4).float()
            expected += p[n, c] * torch.outer(e - p[n], x[n]).square()
    torch.testing.assert_close(fisher["weight"], expected / 10)


def test_input_grams_are_the_design_matrices_of_linear_and_conv_layers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1, bias=False), torch.nn.Flatten(),
                                torch.nn.Linear(3 * 4 * 4, 5))
    x = torch.randn(6, 2, 4, 4)
    grams = tv.input_grams(model, [(x, None)], num_examples=6)
    patches = torch.nn.functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 18).double()
    torch.testing.assert_close(grams["0.weight"], patches.T @ patches / len(patches))
    # The unfolded rows are the conv's design matrix: X W^T is the convolution's output.
    out = (patches.float() @ model[0].weight.reshape(3, -1).T).reshape(6, 16, 3).permute(0, 2, 1).reshape(6, 3, 4, 4)
    torch.testing.assert_close(out, model[0](x))
    flat = model[1](model[0](x)).double()
    torch.testing.assert_close(grams["2.weight"], flat.T @ flat / 6)
