"""L1 pruning: the requested fraction is removed, and pruned weights stay zero through retraining."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from mergelab.errors import UserError
from mergelab.models import build_model, unit_graph
from mergelab.pruning import apply_masks, freeze_pruned, l1_masks, prunable_weights, sparsity

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"


def model_and_keys(family, options):
    torch.manual_seed(0)
    model = build_model(OmegaConf.merge(OmegaConf.load(CONF / f"{family}.yaml"), options), 10, 1, 8)
    return model, prunable_weights(unit_graph(model))


@pytest.mark.parametrize("kind", ["unstructured", "structured"])
@pytest.mark.parametrize("family,options", [("mlpnet", {"hidden": [40, 20]}), ("resnet20", {"width": 0.5})])
def test_pruning_removes_the_requested_fraction(kind, family, options):
    model, keys = model_and_keys(family, options)
    assert "classifier.weight" not in keys and "fc.weight" not in keys
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = l1_masks(model.state_dict(), keys, 0.3, kind)
    apply_masks(model, masks)
    params = dict(model.named_parameters())
    for key in keys:
        weight = params[key]
        if kind == "unstructured":
            assert int((weight == 0).sum()) == round(0.3 * weight.numel())
            # the smallest magnitudes went: every pruned |w| <= every kept |w|
            assert before[key][~masks[key]].abs().max() <= before[key][masks[key]].abs().min()
        else:
            dead = (weight.flatten(1) == 0).all(1)
            assert int(dead.sum()) == round(0.3 * weight.shape[0])
            norms = before[key].abs().flatten(1).sum(1)
            assert norms[dead].max() <= norms[~dead].min()
    assert sparsity(model, keys) == pytest.approx(0.3, abs=0.02)


def test_pruned_weights_stay_zero_through_sgd_with_momentum_and_weight_decay():
    model, keys = model_and_keys("mlpnet", {"hidden": [40, 20]})
    masks = l1_masks(model.state_dict(), keys, 0.5, "unstructured")
    apply_masks(model, masks)
    handles = freeze_pruned(model, masks)
    for optimizer in (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4),
                      torch.optim.AdamW(model.parameters(), lr=0.01)):
        for _ in range(5):
            loss = F.cross_entropy(model(torch.randn(16, 1, 8, 8)), torch.randint(0, 10, (16,)))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    params = dict(model.named_parameters())
    for key in keys:
        assert (params[key][~masks[key]] == 0).all()
        assert (params[key][masks[key]] != 0).all()  # the kept weights did train
    for handle in handles:
        handle.remove()


def test_bad_pruning_options_are_user_errors():
    model, keys = model_and_keys("mlpnet", {"hidden": [8]})
    with pytest.raises(UserError, match="prune.type"):
        l1_masks(model.state_dict(), keys, 0.3, "random")
    with pytest.raises(UserError, match="prune.fraction"):
        l1_masks(model.state_dict(), keys, 1.5, "structured")
