"""finetune.py: the seeded hyperparameter search, the shared start point (zero, seeded, linear-probe heads), and a
population fine-tuned and souped end to end."""

import json

import pytest
import torch

from conftest import make_cfg
from mergelab.checkpoints import load_checkpoint
from mergelab.errors import UserError
from mergelab.evaluation import evaluate
from mergelab.runner import Context, _run
from mergelab.tasks.finetune import apply_hparams, draw_hparams, start_point

UPSTREAM = "dataset.classes=[0,1,2,3,4]"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """An MLP pretrained on digits 0-4 (the upstream task); fine-tuning targets all ten digits."""
    out = tmp_path_factory.mktemp("pretrained")
    _run(make_cfg("train", [UPSTREAM, "train.epochs=2", "ema.decays=[]", "model.hidden=[64,32]"], out))
    return out


def test_random_search_is_a_function_of_seed_and_index():
    cfg = make_cfg("finetune", ["optimizer.lr=0.02", "optimizer.weight_decay=1e-4"])
    draws = [draw_hparams(cfg, i) for i in range(8)]
    assert draws == [draw_hparams(cfg, i) for i in range(8)]
    assert len({d["data_seed"] for d in draws}) == 8 and len({d["optimizer.lr"] for d in draws}) == 8
    for d in draws:
        assert 0.02 / 3 <= d["optimizer.lr"] <= 0.02 * 3
        assert 1e-5 <= d["optimizer.weight_decay"] <= 1e-3
        assert 2 <= d["train.epochs"] <= 4 and d["train.label_smoothing"] in (0.0, 0.1, 0.2)
        assert d["dataset.augment"] in (True, False)
    assert {d["train.epochs"] for d in draws} == {2, 3, 4}  # the whole range is reached
    other = make_cfg("finetune", ["search.seed=1"])
    assert draw_hparams(other, 0) != draw_hparams(cfg, 0)
    tuned = apply_hparams(cfg, draws[0])
    assert tuned.optimizer.lr == draws[0]["optimizer.lr"] and tuned.train.epochs == draws[0]["train.epochs"]
    assert cfg.optimizer.lr == 0.02  # the original config is untouched


def test_grid_search_walks_the_cartesian_product():
    cfg = make_cfg("finetune", ["search.mode=grid", "+search.grid.lr=[0.1,0.2]"])
    cfg.search.grid = {"optimizer.lr": [0.1, 0.2], "train.epochs": [1, 2, 3]}
    points = [draw_hparams(cfg, i) for i in range(6)]
    assert [(p["optimizer.lr"], p["train.epochs"]) for p in points] == \
        [(0.1, 1), (0.1, 2), (0.1, 3), (0.2, 1), (0.2, 2), (0.2, 3)]
    with pytest.raises(UserError, match="outside search.grid"):
        draw_hparams(cfg, 6)
    with pytest.raises(UserError, match="not a setting"):
        apply_hparams(cfg, {"optimizer.learning_rate": 0.1})


def start(tmp_path, pretrained, *overrides, name="run"):
    cfg = make_cfg("finetune", [f"pretrained_from={pretrained}", *overrides], tmp_path / name)
    ctx = Context(cfg=cfg, run_dir=tmp_path / name, device=torch.device("cpu"))
    data = ctx.data()
    return (*start_point(ctx, data), data)


def test_every_head_is_shared_and_the_backbone_is_the_pretrained_one(tmp_path, pretrained):
    backbone, _ = load_checkpoint(pretrained / "checkpoints" / "last.safetensors")
    zero, _, info, _ = start(tmp_path, pretrained, "head=zero")
    assert info["head"] == "zero" and zero.classifier.weight.shape == (10, 32)
    assert not zero.classifier.weight.any() and not zero.classifier.bias.any()
    for k, v in zero.state_dict().items():
        if not k.startswith("classifier"):
            assert torch.equal(v, backbone[k]), k
    torch.manual_seed(123)  # the seeded head must not depend on the global RNG
    a, _, _, _ = start(tmp_path, pretrained, "head=seeded", "init_cache=" + str(tmp_path / "a"))
    torch.manual_seed(456)
    b, _, _, _ = start(tmp_path, pretrained, "head=seeded", "init_cache=" + str(tmp_path / "b"))
    c, _, _, _ = start(tmp_path, pretrained, "head=seeded", "head_seed=1", "init_cache=" + str(tmp_path / "c"))
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)


def test_linear_probe_is_fitted_once_and_its_head_reproduces_the_probe(tmp_path, pretrained):
    model, _, info, data = start(tmp_path, pretrained, "head=linear_probe")
    assert not info["cached"] and info["probe_C"] in (0.01, 0.1, 1.0, 10.0)
    assert info["path"].parent == pretrained / "checkpoints" / "finetune_init"
    # The head holds the sklearn probe: the model's validation accuracy at the start is the probe's.
    assert evaluate(model, data.val)["acc"] == pytest.approx(info["probe_val_acc"], abs=0.5)
    assert info["probe_val_acc"] > 50  # features pretrained on digits 0-4 already separate all ten
    again, _, cached, _ = start(tmp_path, pretrained, "head=linear_probe", "index=5", name="other")
    assert cached["cached"] and cached["path"] == info["path"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_finetune_needs_a_pretrained_source(tmp_path):
    with pytest.raises(UserError, match="needs a pretrained model"):
        _run(make_cfg("finetune", [], tmp_path))


def test_population_finetuned_from_a_shared_start_then_souped(tmp_path, pretrained):
    # A small lr: SGD at 0.01 already distorts this tiny MLP's features (LP-FT's point); MLPs do not like shifted digits.
    fast = ["search.epochs=[1,1]", "optimizer.lr=0.002", "search.augment=[false]", "head=linear_probe"]
    runs = []
    for index in range(3):
        out = tmp_path / "pop" / str(index)
        _run(make_cfg("finetune", [f"pretrained_from={pretrained}", f"index={index}", *fast], out))
        runs.append(out)
    metas = [load_checkpoint(r / "checkpoints" / "last.safetensors")[1] for r in runs]
    results = [json.loads((r / "results.json").read_text()) for r in runs]
    for meta, result in zip(metas, results):
        assert meta["hparams"] == result["hparams"] and result["task"] == "finetune"
        assert result["metrics"]["raw/test_acc"] > 50
    assert len({m["init"] for m in metas}) == 1 and len({m["hparams"]["data_seed"] for m in metas}) == 3
    out = tmp_path / "soup"
    _run(make_cfg("soup", [f"ingredients={tmp_path}/pop/*"], out))
    soup = json.loads((out / "results.json").read_text())
    methods = {m["method"]: m for m in soup["methods"]}
    assert methods["wiseft"]["pretrained"] == metas[0]["init"] and 0 <= methods["wiseft"]["alpha"] <= 1
    assert [i["hparams"] for i in soup["ingredients"]] == [r["hparams"] for r in results]
    # Ingredients fine-tuned from one start stay in one basin: their uniform soup is a working classifier.
    assert methods["uniform"]["test_acc"] > 50


def test_multitask_benchmark_fine_tunes_per_task_trains_the_joint_model_and_merges(tmp_path, pretrained):
    """Tasks are a class subset and an input domain; every merge is scored with each task's own head."""
    common = [f"pretrained_from={pretrained}", "search.mode=none", "train.epochs=1", "linear_probe.C=[1.0]",
              f"init_cache={tmp_path / 'init'}"]
    for name, task in (("lo", "dataset.classes=[0,1,2,3,4]"), ("rotated", "dataset.domain=rotated")):
        _run(make_cfg("finetune", [*common, task], tmp_path / "ft" / name))
    joint = make_cfg("finetune", [*common, "tasks=[{classes:[0,1,2,3,4]},{domain:rotated}]"], tmp_path / "joint")
    _run(joint)
    assert sorted(p.name for p in (tmp_path / "joint" / "checkpoints").glob("*.safetensors")) == \
        ["task0.safetensors", "task1.safetensors"]
    merges = "merge=[ensemble,uniform,greedy,task_arithmetic,ties,model_stock,fisher,regmean]"
    _run(make_cfg("soup", [f"ingredients={tmp_path}/ft/*", merges, "merge.task_arithmetic.lam=[0.0,1.0]",
                           "merge.fisher.num_examples=32", "merge.regmean.num_examples=32",
                           f"multitask={tmp_path}/joint/checkpoints/task*.safetensors"], tmp_path / "soup"))
    results = json.loads((tmp_path / "soup" / "results.json").read_text())
    assert [t["name"] for t in results["tasks"]] == ["0-4", "rotated"]
    rows = {r["method"]: r for r in results["methods"]}
    assert list(rows) == ["fine-tuned", "pretrained", "multi-task model", "ensemble", "uniform", "greedy",
                          "task_arithmetic", "ties", "model_stock", "fisher", "regmean"]
    for row in rows.values():
        assert 0 <= row["0-4"] <= 100 and 0 <= row["rotated"] <= 100
        assert row["test_acc"] == pytest.approx((row["0-4"] + row["rotated"]) / 2)
    assert rows["fine-tuned"]["0-4"] > 80 and rows["multi-task model"]["0-4"] > 80
    # lambda = 0 is the pretrained backbone: its validation score is the pretrained row's.
    curve = {c["params"]["lam"]: c["val_score"] for c in rows["task_arithmetic"]["curve"]}
    assert curve[0.0] == pytest.approx(rows["pretrained"]["val_acc"])
