"""Model soups: the recipes' identities as pure functions, and soup.py end to end on digits populations."""

import dataclasses
import json
import shutil

import pytest
import torch
from omegaconf import OmegaConf

from conftest import make_cfg, run_script
from mergelab.checkpoints import load_checkpoint, save_checkpoint
from mergelab.data import build_data
from mergelab.errors import UserError
from mergelab.merging import soups
from mergelab.models import build_model
from mergelab.runner import _run
from mergelab.tasks import soup as soup_task


# ------------------------------------------------------------------------------------------------ pure functions
def random_states(n, seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 3))
    states = []
    for _ in range(n):
        state = {k: v + torch.randn_like(v) if v.is_floating_point() else v.clone() for k, v in net.state_dict().items()}
        states.append(state)
    return states


def naive_mean(states):
    return {k: torch.stack([s[k].double() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v
            for k, v in states[0].items()}


def assert_states_close(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)


def test_uniform_soup_is_the_mean_of_the_state_dicts():
    states = random_states(5)
    states[3]["1.num_batches_tracked"] = torch.tensor(7)
    soup = soups.uniform_soup(iter(states))  # a generator is enough: the soup streams
    assert_states_close(soup, naive_mean(states))
    assert soup["1.num_batches_tracked"] == states[0]["1.num_batches_tracked"]  # integers: the first state's


def test_every_recipe_of_identical_ingredients_is_the_ingredient():
    (state,) = random_states(1)
    population = [state] * 4
    score = lambda s: float(s["0.weight"].sum())  # noqa: E731
    assert_states_close(soups.uniform_soup(population), state)
    assert_states_close(soups.greedy_soup(population.__getitem__, [0, 1, 2, 3], score).state, state)
    assert_states_close(soups.pruned_soup(population.__getitem__, [0, 1, 2, 3], score).state, state)
    _, mixed, _ = soups.wiseft(state, state, [0.0, 0.3, 1.0], score)
    assert_states_close(mixed, state)


def test_greedy_keeps_an_ingredient_that_leaves_the_score_unchanged_unless_strict():
    states = random_states(4)
    flat = lambda s: 50.0  # noqa: E731 -- every candidate scores the same
    assert soups.greedy_soup(states.__getitem__, [2, 0, 1, 3], flat).selected == [2, 0, 1, 3]
    assert soups.greedy_soup(states.__getitem__, [2, 0, 1, 3], flat, strict=True).selected == [2]
    assert soups.greedy_soup(states.__getitem__, [2, 0, 1, 3], flat, max_ingredients=2).selected == [2, 0]


def naive_greedy(states, order, score):
    """Algorithm 1 of model soups, re-averaging the selection from scratch at every step."""
    selected = [order[0]]
    best = score(naive_mean([states[i] for i in selected]))
    for i in order[1:]:
        value = score(naive_mean([states[j] for j in selected + [i]]))
        if value >= best:
            selected, best = selected + [i], value
    return selected, best


def test_running_sum_greedy_equals_re_averaging_from_scratch():
    states = random_states(8, seed=3)
    target = naive_mean(states[:3])
    # A score with a real optimum: closeness of the soup to the mean of the first three ingredients.
    score = lambda s: -sum(float((s[k].double() - target[k].double()).square().sum()) for k in target  # noqa: E731
                           if s[k].is_floating_point())
    order = [5, 0, 7, 1, 2, 6, 3, 4]
    accepted = []  # every accepted soup as the callback saw it (copied: candidates live in reused buffers)
    result = soups.greedy_soup(states.__getitem__, order, score,
                               on_accept=lambda sel, s: accepted.append((sel, {k: v.clone() for k, v in s.items()})))
    expected, best = naive_greedy(states, order, score)
    assert result.selected == expected and 1 < len(expected) < 8
    assert result.score == pytest.approx(best)
    assert_states_close(result.state, naive_mean([states[i] for i in expected]))
    assert [n for n, _ in result.trace][-1] == expected
    for selected, state in accepted:  # each accepted soup is the mean of its selection at that step
        assert_states_close(state, naive_mean([states[i] for i in selected]))


def test_greedy_second_pass_takes_a_rejected_ingredient_that_now_helps():
    states = [{"w": torch.tensor([v])} for v in (1.2, 1.6, 0.5)]
    score = lambda s: -abs(float(s["w"]) - 1.0)  # noqa: E731 -- the best soup has w = 1
    # Pass 1: {1.2} -> +1.6 gives 1.4 (worse, rejected) -> +0.5 gives 0.85 (kept). Pass 2: +1.6 gives 1.1 (kept).
    one = soups.greedy_soup(states.__getitem__, [0, 1, 2], score)
    two = soups.greedy_soup(states.__getitem__, [0, 1, 2], score, passes=2)
    assert one.selected == [0, 2] and two.selected == [0, 2, 1]
    assert two.score == pytest.approx(-0.1) and two.score > one.score


def test_pruned_removes_the_worst_first_and_respects_the_minimum():
    states = random_states(5)
    flat = lambda s: 1.0  # noqa: E731
    assert soups.pruned_soup(states.__getitem__, [4, 3, 2, 1, 0], flat).selected == [0]
    assert soups.pruned_soup(states.__getitem__, [4, 3, 2, 1, 0], flat, min_ingredients=3).selected == [2, 1, 0]
    assert soups.pruned_soup(states.__getitem__, [4, 3, 2, 1, 0], flat, strict=True).selected == [4, 3, 2, 1, 0]
    # An outlier that drags the soup away from the others is the one removed.
    outlier = {k: v * 100 if v.is_floating_point() else v for k, v in states[2].items()}
    population = states[:2] + [outlier] + states[3:]
    target = naive_mean(states[:2] + states[3:])
    score = lambda s: -float((s["0.weight"] - target["0.weight"]).abs().sum())  # noqa: E731
    result = soups.pruned_soup(population.__getitem__, [2, 0, 1, 3, 4], score, strict=True)
    assert result.selected == [0, 1, 3, 4]
    assert_states_close(result.state, target)


def test_wiseft_interpolates_and_picks_alpha_on_the_score():
    theta0, theta1 = random_states(2)
    assert_states_close(soups.interpolate(theta0, theta1, 0.0), theta0 | {"1.num_batches_tracked": theta1["1.num_batches_tracked"]})
    assert_states_close(soups.interpolate(theta0, theta1, 1.0), theta1)
    assert_states_close(soups.interpolate(theta0, theta1, 0.5), naive_mean([theta0, theta1]))
    wanted = soups.interpolate(theta0, theta1, 0.3)
    score = lambda s: -float((s["0.weight"] - wanted["0.weight"]).abs().sum())  # noqa: E731
    alpha, state, curve = soups.wiseft(theta0, theta1, [1.0, 0.0, 0.3, 0.6], score)
    assert alpha == 0.3 and [a for a, _ in curve] == [0.0, 0.3, 0.6, 1.0]
    assert_states_close(state, wanted)


def test_ensemble_and_hard_vote():
    logits = [torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[0.0, 3.0, 0.0]]), torch.tensor([[0.0, 0.0, 1.0]])]
    torch.testing.assert_close(soups.logit_ensemble(logits), torch.tensor([[2 / 3, 1.0, 1 / 3]]))
    predictions = torch.tensor([[0, 1, 2, 2], [1, 1, 0, 2], [1, 0, 1, 0]])
    # Column 0: 1 wins 2-1; column 2: a three-way tie goes to the smallest class.
    assert soups.hard_vote(predictions, 3).tolist() == [1, 1, 0, 2]


# ------------------------------------------------------------------------------------------------ soup.py end to end
@pytest.fixture(scope="module")
def trained_mlp(tmp_path_factory):
    """An MLP trained briefly on digits: ingredients perturbed from it are real classifiers (about 90%)."""
    out = tmp_path_factory.mktemp("base")
    _run(make_cfg("train", ["train.epochs=3", "ema.decays=[]"], out))
    return load_checkpoint(out / "checkpoints" / "last.safetensors")[0]


def make_population(folder, n, model="mlpnet", noise=0.02, seed=0, trained_seed=0, base=None, overrides=(),
                    split_seed=0):
    """``n`` ingredients around one shared start (``base``, or a fresh model from ``seed``), each perturbed by
    Gaussian noise of scale ``noise``, saved with the metadata finetune.py writes."""
    cfg = make_cfg("train", [f"model={model}", *overrides])
    torch.manual_seed(seed)
    base = base if base is not None else build_model(cfg.model, 10, 1, 8).state_dict()
    paths = []
    for i in range(n):
        state = {k: v + noise * torch.randn_like(v) if v.is_floating_point() else v.clone() for k, v in base.items()}
        for k in state:
            if k.endswith("running_var"):
                state[k] = state[k].abs() + 0.5
        meta = {"model": OmegaConf.to_container(cfg.model, resolve=True), "num_classes": 10, "in_channels": 1,
                "image_size": 8, "dataset": {"name": "digits", "classes": list(range(10))}, "task": "finetune",
                "seed": trained_seed, "hparams": {"index": i}}
        if split_seed is not None:  # finetune.py records it; train.py checkpoints do not
            meta["split_seed"] = split_seed
        paths.append(save_checkpoint(folder / f"run{i}" / "checkpoints" / "last.safetensors", state, meta))
    return paths


def soup_results(tmp_path, ingredients, *overrides, name="soup"):
    out = tmp_path / name
    _run(make_cfg("soup", [f"ingredients={ingredients}", *overrides], out))
    return json.loads((out / "results.json").read_text()), out


def test_soup_runs_every_recipe_and_writes_the_schema(tmp_path, trained_mlp):
    make_population(tmp_path / "pop", 4, base=trained_mlp)
    results, out = soup_results(tmp_path, f"{tmp_path}/pop/*")
    methods = {m["method"]: m for m in results["methods"]}
    assert {"best", "uniform", "greedy", "greedy_random", "pruned", "ensemble(all)", "ensemble(greedy)",
            "vote(all)"} <= set(methods) and "ingredient[3]" in methods
    assert "wiseft" not in methods and any("wiseft skipped" in n for n in results["notes"])
    for m in results["methods"]:
        assert set(m) >= {"method", "n_ingredients", "val_acc", "test_acc", "forward_passes", "time_s", "selected"}
    assert methods["uniform"]["n_ingredients"] == 4 and methods["uniform"]["forward_passes"] == 1
    assert methods["ensemble(all)"]["forward_passes"] == 4
    assert [set(i) for i in results["ingredients"]] == [{"path", "val_acc", "test_acc", "hparams"}] * 4
    assert results["greedy_curve"][0]["n"] == 1 and set(results["greedy_curve"][0]) == {"n", "val_acc", "test_acc"}
    best = max(results["ingredients"], key=lambda i: i["val_acc"])
    assert methods["best"]["val_acc"] == best["val_acc"]
    assert results["checkpoint_reads"] == 4  # every checkpoint read once, whatever the number of recipes
    soup_state, meta = load_checkpoint(out / "checkpoints" / "uniform.safetensors")
    assert meta["soup"]["method"] == "uniform" and len(meta["soup"]["selected"]) == 4
    assert list(out.glob("events.out.tfevents.*"))


def test_greedy_soup_of_duplicates_keeps_both_with_ge_and_one_when_strict(tmp_path):
    (path,) = make_population(tmp_path / "pop", 1)
    twin = tmp_path / "pop" / "twin" / "checkpoints" / "last.safetensors"
    twin.parent.mkdir(parents=True)
    shutil.copy(path, twin)
    loose, _ = soup_results(tmp_path, f"{tmp_path}/pop/*", "merge=greedy")
    strict, _ = soup_results(tmp_path, f"{tmp_path}/pop/*", "merge=greedy", "merge.greedy.strict=true", name="strict")
    assert [m["n_ingredients"] for m in loose["methods"] if m["method"] == "greedy"] == [2]
    assert [m["n_ingredients"] for m in strict["methods"] if m["method"] == "greedy"] == [1]


class ShiftedLabels:
    """Test batches whose labels are all wrong: a selection that peeks at test would change."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        for x, y in self.batches:
            yield x, (y + 1) % 10


def test_selection_never_looks_at_the_test_split(tmp_path, monkeypatch, trained_mlp):
    make_population(tmp_path / "pop", 5, noise=0.1, base=trained_mlp)
    honest, _ = soup_results(tmp_path, f"{tmp_path}/pop/*", "cache=null")

    def corrupted_test(*args, **kwargs):
        data = build_data(*args, **kwargs)
        return dataclasses.replace(data, test=ShiftedLabels(data.test))

    monkeypatch.setattr(soup_task, "build_data", corrupted_test)
    shifted, _ = soup_results(tmp_path, f"{tmp_path}/pop/*", name="shifted")
    for a, b in zip(honest["methods"], shifted["methods"]):
        assert (a["method"], a["selected"], a["val_acc"]) == (b["method"], b["selected"], b["val_acc"])
    assert [m["test_acc"] for m in honest["methods"]] != [m["test_acc"] for m in shifted["methods"]]


def test_recompute_bn_matches_update_bn_and_false_keeps_averaged_buffers(tmp_path):
    small = ["model.width=0.125"]  # a small VGG11 with BatchNorm keeps this test fast
    paths = make_population(tmp_path / "pop", 3, model="vgg11", noise=0.05, overrides=small)
    less = "dataset.max_train_samples=400"
    recal, recal_dir = soup_results(tmp_path, f"{tmp_path}/pop/*", "merge=uniform", "recompute_bn=true", less)
    avg, avg_dir = soup_results(tmp_path, f"{tmp_path}/pop/*", "merge=uniform", "recompute_bn=false", less, name="avg")
    averaged = naive_mean([load_checkpoint(p)[0] for p in paths])
    kept, _ = load_checkpoint(avg_dir / "checkpoints" / "uniform.safetensors")
    assert_states_close(kept, averaged)
    recomputed, _ = load_checkpoint(recal_dir / "checkpoints" / "uniform.safetensors")
    reference = build_model(make_cfg("train", ["model=vgg11", *small]).model, 10, 1, 8)
    reference.load_state_dict(averaged)
    data = build_data(make_cfg("soup", [less]).dataset, batch_size=1024, eval_batch_size=1024, seed=0,
                      device=torch.device("cpu"))
    torch.optim.swa_utils.update_bn(data.train_eval, reference)
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(recomputed[k], v, msg=k)
    stats = [k for k in averaged if k.endswith("running_mean")]
    assert stats and not any(torch.allclose(recomputed[k], averaged[k]) for k in stats)
    assert recal["metrics"]["uniform/val_acc"] != avg["metrics"]["uniform/val_acc"] or \
        recal["metrics"]["uniform/test_acc"] != avg["metrics"]["uniform/test_acc"]


def test_individual_evaluations_are_cached_by_file_identity(tmp_path, trained_mlp):
    paths = make_population(tmp_path / "pop", 2, base=trained_mlp)
    cache = tmp_path / "cache"
    first, _ = soup_results(tmp_path, f"{tmp_path}/pop/*", "merge=uniform", f"cache={cache}")
    entries = sorted(cache.glob("eval-*.safetensors"))
    assert len(entries) == 2
    # Poison the cache: a second run must read it rather than evaluate again...
    for entry in entries:
        tensors, meta = load_checkpoint(entry)
        tensors["val"] = torch.zeros_like(tensors["val"])
        tensors["val"][:, 0] = 1  # predicts class 0 everywhere: about 10% accuracy
        save_checkpoint(entry, tensors, meta)
    second, _ = soup_results(tmp_path, f"{tmp_path}/pop/*", "merge=uniform", f"cache={cache}", name="again")
    assert first["ingredients"][0]["val_acc"] > 50
    assert second["ingredients"][0]["val_acc"] == pytest.approx(10, abs=2)
    # ...and a rewritten checkpoint (new mtime) is evaluated afresh.
    tensors, meta = load_checkpoint(paths[0])
    save_checkpoint(paths[0], tensors, meta)
    third, _ = soup_results(tmp_path, f"{tmp_path}/pop/*", "merge=uniform", f"cache={cache}", name="third")
    assert third["ingredients"][0]["val_acc"] == first["ingredients"][0]["val_acc"]


def test_soup_errors_name_the_problem(tmp_path):
    with pytest.raises(UserError, match="no checkpoint or run folder matches"):
        soup_results(tmp_path, f"{tmp_path}/nothing/*")
    (one,) = make_population(tmp_path / "one", 1)
    with pytest.raises(UserError, match="at least 2 checkpoints"):
        soup_results(tmp_path, f"{tmp_path}/one/*")
    make_population(tmp_path / "mixed", 1)
    make_population(tmp_path / "mixed2", 1, model="resnet20")
    with pytest.raises(UserError, match="mixed2.*architecture"):
        soup_results(tmp_path, f"[{tmp_path}/mixed/*,{tmp_path}/mixed2/*]")
    corrupt = make_population(tmp_path / "corrupt", 2)[1]
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match=f"corrupt checkpoint {corrupt}"):
        soup_results(tmp_path, f"{tmp_path}/corrupt/*")
    make_population(tmp_path / "seeds", 1, split_seed=None)
    make_population(tmp_path / "seeds2", 1, trained_seed=1, split_seed=None)
    with pytest.raises(UserError, match="seeds2.*validation splits differ"):
        soup_results(tmp_path, f"[{tmp_path}/seeds/*,{tmp_path}/seeds2/*]", "dataset.split_seed=null")
    make_population(tmp_path / "split", 2, split_seed=3)
    with pytest.raises(UserError, match="split of seed 0.*validation splits differ"):
        soup_results(tmp_path, f"{tmp_path}/split/*")
    with pytest.raises(UserError, match="not a soup recipe"):
        soup_results(tmp_path, f"{tmp_path}/mixed/*", "+merge.alpha=0.5")
    with pytest.raises(UserError, match="merge=Average is not a soup recipe"):
        soup_results(tmp_path, f"{tmp_path}/mixed/*", "merge=average")
    with pytest.raises(UserError, match="recompute_bn=both"):
        soup_results(tmp_path, f"{tmp_path}/mixed/*", "recompute_bn=both")


def test_predictions_for_an_image_folder_and_hard_vote_of_csvs(tmp_path, trained_mlp):
    import csv

    import numpy as np
    import sklearn.datasets
    from PIL import Image

    digits = sklearn.datasets.load_digits()
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(40):
        Image.fromarray(np.round(digits.images[i] * 255 / 16).astype(np.uint8)).save(folder / f"img{i:02d}.png")
    make_population(tmp_path / "pop", 3, base=trained_mlp)
    _, out = soup_results(tmp_path, f"{tmp_path}/pop/*", "merge=[uniform,greedy]", f"predict.folder={folder}",
                          "predict.methods=[greedy,uniform,ensemble,vote]")
    tables = {}
    for method in ("greedy", "uniform", "ensemble", "vote"):
        with (out / "predictions" / f"{method}.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert [r["image"] for r in rows] == [f"img{i:02d}.png" for i in range(40)]
        tables[method] = [int(r["label"]) for r in rows]
        # Real digits through the data set's normalisation: the soup's ~90% accuracy carries over.
        assert np.mean(np.array(tables[method]) == digits.target[:40]) > 0.75, method
    _run(make_cfg("soup", [f"predict.vote={out}/predictions/*.csv"], tmp_path / "vote"))
    with (tmp_path / "vote" / "predictions" / "vote.csv").open() as f:
        voted = [int(r["label"]) for r in csv.DictReader(f)]
    for i, label in enumerate(voted):
        votes = [tables[m][i] for m in sorted(tables)]
        assert votes.count(label) == max(votes.count(v) for v in votes)


@pytest.mark.slow
def test_cli_error_is_one_line_with_exit_status_2(tmp_path):
    proc = run_script("soup.py", f"ingredients={tmp_path}/none/*", f"hydra.run.dir={tmp_path}/run", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: no checkpoint") and len(proc.stderr.strip().splitlines()) == 1


def test_merging_identical_task_vectors_returns_that_fine_tuned_model_on_every_task(tmp_path):
    """Four tasks whose fine-tuned models share one backbone (heads differ): every merge of the backbones, with
    its hyperparameters fixed where the identity needs them, scores exactly like the fine-tuned models."""
    torch.manual_seed(0)
    model_cfg = {"_target_": "mergelab.models.MLPNet", "hidden": [32]}
    pretrained = build_model(model_cfg, 10, 1, 8).state_dict()
    tuned = {k: v + 0.5 * torch.randn_like(v) for k, v in pretrained.items()}
    meta = {"model": model_cfg, "in_channels": 1, "image_size": 8, "seed": 0, "split_seed": 0, "task": "finetune"}
    save_checkpoint(tmp_path / "pretrained.safetensors", pretrained, {**meta, "num_classes": 10,
                    "dataset": {"name": "digits", "classes": list(range(10))}})
    tasks = [([0, 1, 2, 3, 4], None), ([5, 6, 7, 8, 9], None), (list(range(10)), "rotated"), (list(range(10)), "inverted")]
    for i, (classes, domain) in enumerate(tasks):
        state = {**tuned, "classifier.weight": torch.randn(len(classes), 32), "classifier.bias": torch.randn(len(classes))}
        dataset = {"name": "digits", "classes": classes, **({"domain": domain} if domain else {})}
        save_checkpoint(tmp_path / "pop" / f"{i}.safetensors", state, {**meta, "num_classes": len(classes),
                        "dataset": dataset, "init": str(tmp_path / "pretrained.safetensors")})
    merges = ["merge=[uniform,task_arithmetic,ties,dare,model_stock,fisher,regmean]", "merge.task_arithmetic.lam=0.25",
              "merge.ties.k=1.0", "merge.ties.lam=1.0", "merge.dare.p=0.0", "merge.dare.lam=0.25",
              "merge.fisher.num_examples=16", "merge.regmean.num_examples=16", "merge.regmean.alpha=0.5"]
    results, _ = soup_results(tmp_path, f"{tmp_path}/pop/*", *merges)
    rows = {r["method"]: r for r in results["methods"]}
    names = [t["name"] for t in results["tasks"]]
    assert names == ["0-4", "5-9", "rotated", "inverted"]
    assert "test_joint_acc" in rows["fine-tuned"]
    for method in ("uniform", "task_arithmetic", "ties", "dare", "model_stock", "fisher", "regmean"):
        for name in (*names, "val_acc", "test_joint_acc"):
            assert rows[method][name] == pytest.approx(rows["fine-tuned"][name], abs=1e-9), (method, name)
    assert rows["pretrained"]["val_acc"] != rows["fine-tuned"]["val_acc"]  # the identity is not trivial


def test_task_arithmetic_at_one_over_n_is_the_uniform_soup_and_the_grid_is_chosen_on_validation(tmp_path, trained_mlp):
    paths = make_population(tmp_path / "pop", 3, base=trained_mlp, noise=0.05)
    pretrained = save_checkpoint(tmp_path / "pretrained.safetensors", trained_mlp, load_checkpoint(paths[0])[1])
    results, out = soup_results(tmp_path, f"{tmp_path}/pop/*", "merge=[uniform,task_arithmetic,ties]",
                                f"pretrained={pretrained}", "merge.task_arithmetic.lam=[0.3333333333333333,0.0]",
                                "merge.ties.k=[0.2,1.0]", "merge.ties.lam=1.0")
    uniform = load_checkpoint(out / "checkpoints" / "uniform.safetensors")[0]
    arithmetic = load_checkpoint(out / "checkpoints" / "task_arithmetic.safetensors")[0]
    methods = {m["method"]: m for m in results["methods"]}
    curve = methods["task_arithmetic"]["curve"]
    chosen = max(curve, key=lambda c: c["val_score"])  # the first of the best on validation
    assert methods["task_arithmetic"]["params"] == chosen["params"]
    if chosen["params"]["lam"] > 0:  # theta_0 + (1/N) sum_i (theta_i - theta_0) is the mean of the theta_i
        assert_states_close(arithmetic, uniform)
    else:
        assert_states_close(arithmetic, trained_mlp)
    assert [c["params"] for c in methods["ties"]["curve"]] == [{"k": 0.2, "lam": 1.0}, {"k": 1.0, "lam": 1.0}]
    assert results["metrics"]["ties/val_acc"] == methods["ties"]["val_acc"]
