"""Post-hoc EMA (Karras et al. 2024): the gamma <-> sigma_rel map, the tracked profile in closed form, the paper's
least-squares reconstruction against closed-form averages and against an independent quadrature, exact resume with
snapshots, and the one command that reconstructs, evaluates, selects and plots from a run folder."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import make_cfg, run_interrupted_then_resumed
from mergelab.checkpoints import load_checkpoint, read_meta
from mergelab.ema import EMA
from mergelab.errors import UserError
from mergelab.merging.posthoc import (combine, decay_to_sigma_rel, gamma_to_sigma_rel, profile_inner,
                                      sigma_rel_to_gamma, solve_coefficients)
from mergelab.runner import _run


def test_sigma_rel_and_gamma_are_inverse_with_the_papers_values():
    # EDM2 Sec. 3.1: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94.
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    for sigma in (0.01, 0.03, 0.2, 0.28):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(sigma)) == pytest.approx(sigma, rel=1e-12)
    # sigma_rel is the profile's standard deviation over its age: check it by quadrature.
    gamma, s = 6.94, np.linspace(0, 1, 200_001)
    p = (gamma + 1) * s ** gamma
    mean = np.trapezoid(s * p, s)
    assert math.sqrt(np.trapezoid((s - mean) ** 2 * p, s)) == pytest.approx(gamma_to_sigma_rel(gamma), rel=1e-6)
    with pytest.raises(ValueError, match="sigma_rel"):
        sigma_rel_to_gamma(0.3)
    # A classic EMA's geometric profile has standard deviation sqrt(d) / (1 - d) steps.
    assert decay_to_sigma_rel(0.99, 1000) == pytest.approx(math.sqrt(0.99) / 0.01 / 1000)


def test_tracked_power_ema_is_the_profile_integrated_over_each_step():
    """After t updates, w_tau carries (tau^(g+1) - (tau-1)^(g+1)) / t^(g+1): the closed form of beta_t's recursion,
    for every step and with ema.every folding (weights of the folded steps land on the fold step)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    track = EMA(model, [], sigma_rels=[0.05, 0.2])
    folded = EMA(model, [], sigma_rels=[0.05], every=3)
    trajectory = []
    for _ in range(12):
        with torch.no_grad():
            model.weight.copy_(torch.randn(2, 3, dtype=torch.float64))
        trajectory.append(model.weight.detach().clone())
        track.update()
        folded.update()
        t = len(trajectory)
        for i, gamma in enumerate(track.gammas):
            tau = np.arange(1, t + 1, dtype=np.float64)
            w = (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / t ** (gamma + 1)
            expected = sum(float(wi) * x for wi, x in zip(w, trajectory))
            torch.testing.assert_close(track.state_dict_for(i)["weight"], expected, rtol=1e-12, atol=1e-12)
    # Folding every 3 steps: the weights at steps 3, 6, 9, 12 stand for their 3-step blocks.
    gamma, t = folded.gammas[0], 12
    ends = np.arange(3, t + 1, 3, dtype=np.float64)
    w = (ends ** (gamma + 1) - (ends - 3) ** (gamma + 1)) / t ** (gamma + 1)
    expected = sum(float(wi) * trajectory[int(e) - 1] for wi, e in zip(w, ends))
    torch.testing.assert_close(folded.state_dict_for(0)["weight"], expected, rtol=1e-12, atol=1e-12)


def test_profile_inner_products_match_quadrature():
    s = np.linspace(0, 50, 500_001)

    def profile(t, gamma):
        return np.where(s <= t, (gamma + 1) * s ** gamma / t ** (gamma + 1), 0.0)

    for (ta, ga), (tb, gb) in [((20, 3.0), (50, 7.0)), ((50, 16.97), (35, 6.94)), ((40, 2.0), (40, 2.0))]:
        numeric = np.trapezoid(profile(ta, ga) * profile(tb, gb), s)
        assert profile_inner(ta, ga, tb, gb) == pytest.approx(numeric, rel=1e-4)
        assert profile_inner(ta, ga, tb, gb) == pytest.approx(profile_inner(tb, gb, ta, ga), rel=1e-12)


def snapshot_times(last=1000, every=50):
    steps = np.arange(every, last + 1, every, dtype=np.float64)
    gammas = [sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10)]
    return np.repeat(steps, 2), np.tile(gammas, len(steps)), gammas


def test_coefficients_solve_the_least_squares_problem_of_the_profiles():
    """Algorithm 3 in closed form equals least squares over the profiles sampled on a fine time grid (an
    independent discretisation), and a target that is one of the snapshots is that snapshot alone."""
    steps, gammas, tracked = snapshot_times(last=200, every=20)
    s = np.linspace(0, 200, 400_001)[1:]
    ds = s[1] - s[0]

    def profiles(ts, gs):
        ts, gs = np.asarray(ts, dtype=np.float64)[:, None], np.asarray(gs, dtype=np.float64)[:, None]
        return np.where(s <= ts, (gs + 1) * (s / ts) ** gs / ts, 0.0) * math.sqrt(ds)

    target_gamma = sigma_rel_to_gamma(0.07)
    x = solve_coefficients(steps, gammas, [200.0], [target_gamma])
    numeric = np.linalg.lstsq(profiles(steps, gammas).T, profiles([200.0], [target_gamma]).T, rcond=None)[0]
    numeric /= numeric.sum()
    np.testing.assert_allclose(x, numeric, rtol=2e-3, atol=2e-3 * np.abs(x).max())
    # The closed form is also the normal equations' solution, before the rescaling to sum 1.
    gram = profile_inner(steps[:, None], gammas[:, None], steps[None], gammas[None])
    rhs = profile_inner(steps[:, None], gammas[:, None], 200.0, target_gamma)
    assert np.allclose(gram @ (x[:, 0] * (rhs.sum() / (gram @ x[:, 0]).sum())), rhs[:, 0], rtol=1e-6)
    # Reproducing a snapshot: the unit vector.
    x = solve_coefficients(steps, gammas, [200.0], [tracked[1]])
    unit = np.zeros_like(x)
    unit[-1] = 1.0
    np.testing.assert_allclose(x, unit, atol=1e-6)


def test_reconstruction_recovers_closed_form_averages_of_a_polynomial_trajectory():
    """w(s) = sum_k c_k (s/T)^k has the power-function average sum_k c_k (g+1)/(g+k+1) (t/T)^k at time t; feed
    the two tracked profiles' averages at the snapshot times, reconstruct other widths at T, compare. The error
    grows as the snapshots get sparser."""
    rng = np.random.default_rng(0)
    last, coeffs = 1000.0, rng.normal(size=(4, 64))

    def average(t, gamma):
        return sum(c * (gamma + 1) / (gamma + k + 1) * (t / last) ** k for k, c in enumerate(coeffs))

    def errors(every, targets):
        steps, gammas, _ = snapshot_times(last=int(last), every=every)
        snapshots = [{"w": torch.from_numpy(average(t, g)), "n": torch.tensor(int(t))} for t, g in zip(steps, gammas)]
        coefs = solve_coefficients(steps, gammas, [last] * len(targets), [sigma_rel_to_gamma(s) for s in targets])
        out = combine(iter(snapshots), coefs)
        assert all(state["n"] == 1000 for state in out)  # integers come from the last snapshot
        return [np.linalg.norm(state["w"].numpy() - average(last, sigma_rel_to_gamma(sigma)))
                / np.linalg.norm(average(last, sigma_rel_to_gamma(sigma))) for sigma, state in zip(targets, out)]

    assert max(errors(10, [0.02, 0.04, 0.07, 0.15])) < 1e-5
    assert errors(10, [0.25])[0] < 1e-3  # wider than both tracked profiles: harder
    sparse = [errors(every, [0.07])[0] for every in (10, 25, 50, 100)]
    assert sparse == sorted(sparse) and sparse[-1] > 10 * sparse[0]


def test_combine_streams_a_weighted_sum():
    states = [{"a": torch.randn(3, 2), "b": torch.randn(4).double()} for _ in range(3)]
    coefs = np.array([[0.5, -1.0], [0.25, 1.5], [0.25, 0.5]])
    out = combine(iter(states), coefs, chunk=2)  # one full chunk, then a partial one
    for j in range(2):
        for k in ("a", "b"):
            torch.testing.assert_close(out[j][k], sum(float(coefs[i, j]) * states[i][k] for i in range(3)))
    with pytest.raises(ValueError, match="2 snapshots for 3 rows"):
        combine(iter(states[:2]), coefs)


POSTHOC = ["ema.posthoc.sigma_rels=[0.05,0.1]", "ema.posthoc.every=4", "ema.decays=[0.9]"]
MLP = ["model=mlpnet", "train.batch_size=128", "dataset.max_train_samples=400"]


def test_resume_with_snapshots_is_bit_identical(tmp_path):
    overrides = [*MLP, "train.epochs=3", *POSTHOC]  # 4 steps per epoch: a snapshot at every epoch's end, one mid
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    _run(make_cfg("train", overrides, straight))
    run_interrupted_then_resumed(overrides, interrupted)

    snaps = sorted(p.name for p in (straight / "checkpoints" / "posthoc").glob("*.safetensors"))
    assert snaps == sorted(p.name for p in (interrupted / "checkpoints" / "posthoc").glob("*.safetensors"))
    steps = json.loads((straight / "results.json").read_text())["steps"]
    assert {read_meta(straight / "checkpoints" / "posthoc" / n)["step"] for n in snaps} == \
        {*range(4, steps + 1, 4), steps}
    for name in [f"posthoc/{n}" for n in snaps] + ["sigma_rel0.05.safetensors", "sigma_rel0.1.safetensors"]:
        a, meta = load_checkpoint(straight / "checkpoints" / name)
        b, _ = load_checkpoint(interrupted / "checkpoints" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert meta["sigma_rel"] in (0.05, 0.1) and meta["gamma"] == pytest.approx(sigma_rel_to_gamma(meta["sigma_rel"]))


def test_one_command_reconstructs_evaluates_selects_and_plots(tmp_path):
    """ema.py on a BatchNorm ResNet tracking two profiles: the reconstruction of each profile from the other's
    snapshots approaches its tracked average; the grid is evaluated with BatchNorm recomputed, the best on validation
    is saved with its sigma_rel, and the figure is written. Then the same from the run folder alone."""
    run = tmp_path / "run"
    _run(make_cfg("ema", ["model=resnet20", "model.width=0.25", "train.epochs=2", "train.batch_size=64",
                          "dataset.max_train_samples=500", *POSTHOC, "ema.tail=null", "ema.recompute_bn=false",
                          "posthoc.grid=[0.03,0.1,0.2]", "posthoc.decays=[0.5]"], run))
    results = json.loads((run / "results.json").read_text())
    info = results["posthoc"]
    assert info["step"] == results["steps"] and info["every"] == 4
    assert [c["sigma_rel"] for c in info["check"]] == [0.05, 0.1]
    # 14 steps with a snapshot every 4 is far coarser than a real run (docs/posthoc_ema.md: < 1e-3 there); the
    # rebuilt profile must still be much closer to the truth than the other tracked profile is.
    assert all(c["rel_err"] < c["nearest_rel_err"] / 2 for c in info["check"])
    assert len(info["grid"]) == 4 and {m["method"] for m in info["marks"]} == {"ema0.9", "sigma_rel0.05",
                                                                                "sigma_rel0.1"}
    assert info["selected_by"] == "recompute_bn_val_acc"
    best = max(info["grid"], key=lambda r: r["recompute_bn_val_acc"])
    assert results["metrics"]["posthoc/sigma_rel"] == best["sigma_rel"]
    assert results["metrics"]["posthoc/test_acc"] == best["recompute_bn_test_acc"]
    state, meta = load_checkpoint(run / "checkpoints" / "posthoc_best.safetensors")
    assert meta["sigma_rel"] == best["sigma_rel"] and meta["recompute_bn"] and meta["step"] == info["step"]
    assert (run / "posthoc_ema.png").stat().st_size > 10_000
    assert any(r["method"].endswith("(decay 0.5)") for r in results["table"])

    again = tmp_path / "again"
    _run(make_cfg("ema", [f"posthoc.run={run}", "posthoc.grid=[0.03,0.1,0.2]", "posthoc.decays=[0.5]"], again))
    other = json.loads((again / "results.json").read_text())
    assert other["posthoc"]["grid"] == info["grid"] and other["posthoc"]["check"] == info["check"]
    assert not (again / "checkpoints" / "last.safetensors").exists()  # nothing was trained


@pytest.mark.parametrize("overrides, message", [
    (["ema.posthoc.sigma_rels=[0.5]"], "must lie in"),
    (["ema.posthoc.sigma_rels=[0.1]", "ema.posthoc.every=3", "ema.every=2"], "multiple of ema.every"),
])
def test_bad_tracking_settings_are_one_line_errors(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        _run(make_cfg("train", [*MLP, "train.epochs=1", *overrides], tmp_path))


def test_reconstruction_from_a_run_without_snapshots_or_with_a_bad_grid_is_refused(tmp_path):
    run = tmp_path / "run"
    _run(make_cfg("train", [*MLP, "train.epochs=1"], run))
    with pytest.raises(UserError, match="no post-hoc EMA snapshots"):
        _run(make_cfg("ema", [f"posthoc.run={run}"], tmp_path / "a"))
    with pytest.raises(UserError, match="not a finished run folder"):
        _run(make_cfg("ema", [f"posthoc.run={tmp_path / 'nothing'}"], tmp_path / "b"))
    _run(make_cfg("train", [*MLP, "train.epochs=1", *POSTHOC], tmp_path / "tracked"))
    with pytest.raises(UserError, match=r"posthoc.grid/posthoc.decays .* not \['decay 0.999"):
        _run(make_cfg("ema", [f"posthoc.run={tmp_path / 'tracked'}", "posthoc.decays=[0.999]"], tmp_path / "c"))


def test_post_hoc_settings_enter_the_resume_fingerprint_only_when_on():
    from mergelab.training import resume_fingerprint

    assert "posthoc" not in resume_fingerprint(make_cfg("train"))["ema"]  # runs from before ema.posthoc resume
    assert resume_fingerprint(make_cfg("train", ["ema.posthoc.sigma_rels=[0.1]"]))["ema"]["posthoc"] == \
        {"sigma_rels": [0.1], "every": None}
