"""Exponential moving averages of a model's weights, for several decays at once.

``shadow <- decay * shadow + (1 - decay) * weight`` after every optimiser step, for every decay of the study in the
same run. All averages share one ``(averages x weights)`` buffer updated by a single broadcast ``lerp_``, so a step
costs one kernel, not a Python loop over parameters or decays (timm's ModelEmaV3 uses one ``torch._foreach_lerp_``
for one decay; on CPU, per-tensor dispatch, even through ``_foreach``, costs more than the arithmetic for small
models). The live weights are read without a copy because the model's averaged tensors are re-seated as views of
one flat buffer; every update first checks that each of them is still that view (see :meth:`EMA._live`).

Two more kinds of average ride in the same fused update, as more rows with their own per-step weight:

- a uniform *tail average* (the SWA-style baseline of Izmailov et al., 2018, here over every step rather than every
  epoch): from step ``tail_start`` on, the equal-weight mean of the weights after each step, with weight
  ``1 / (n + 1)`` at its ``n``-th folded step (the running mean ``mean_n+1 = mean_n + (w - mean_n) / (n + 1)``);
  before ``tail_start`` its weight is 1, so it follows the live weights and starts from them;
- *power-function EMAs* (Karras et al. 2024, EDM2, Sec. 3), one per ``sigma_rel``, with weight
  ``1 - (1 - 1/t)^(gamma + 1)`` after step ``t``: their snapshots let any other averaging length be reconstructed
  after training (:mod:`mergelab.merging.posthoc`).
"""

from __future__ import annotations

import operator
from typing import Iterable

import torch
from torch import nn

from mergelab.merging.posthoc import power_ema_weight, sigma_rel_to_gamma

BUFFER_MODES = ("average", "copy")
WARMUPS = ("tensorflow", "timm")  # ema.warmup: true is "tensorflow"; false is none
TIMM_WARMUP_GAMMA, TIMM_WARMUP_POWER = 1.0, 2 / 3  # timm ModelEmaV3's defaults (warmup_gamma, warmup_power)
TAIL_LABEL = "tail"


class EMA:
    """Moving averages of ``model``'s floating-point state for each decay in ``decays``.

    Args:
        decays: one or several decays in [0, 1).
        warmup: a decay warm-up, so early averages are not dominated by the random initialisation. ``True`` or
            ``"tensorflow"``: ``min(decay, (1 + t) / (10 + t))`` after 0-based step t, the schedule of TensorFlow's
            ``tf.train.ExponentialMovingAverage(decay, num_updates=t)``. ``"timm"``: timm ModelEmaV3's
            ``min(decay, 1 - (1 + t / gamma)^-power)`` with its defaults gamma = 1, power = 2/3 (0 after the first
            step: the average starts as a copy). ``False``: none.
        buffers: what the averaged model holds for floating-point buffers (BatchNorm running statistics):
            ``"average"`` averages them like weights; ``"copy"`` copies the live model's. Integer buffers
            (``num_batches_tracked``) are always copied. Either way, :func:`mergelab.evaluation.recompute_bn`
            can recompute the statistics for the averaged weights before evaluation.
        tail_start: if not None, also keep the uniform average of the weights after every step from this
            (0-based) optimiser step on; it is the last average, labelled ``tail``.
        sigma_rels: power-function EMAs to track (EDM2's relative width; ``gamma`` from
            :func:`mergelab.merging.posthoc.sigma_rel_to_gamma`), after the decays, labelled ``sigma_rel<s>``.
        every: fold the weights in every ``every`` steps with decay ``decay ** every`` (power EMAs:
            ``(1 - every/t)^(gamma + 1)``), which keeps the averaging horizon (in steps) and divides the cost;
            1 (the default) is the exact per-step recursion.
        flatten: re-seat the model's averaged tensors as views of one contiguous buffer, so that an update reads
            them without a copy.
    """

    def __init__(self, model: nn.Module, decays: Iterable[float], warmup: bool = False, buffers: str = "average",
                 tail_start: int | None = None, every: int = 1, flatten: bool = True,
                 sigma_rels: Iterable[float] = ()):
        self.decays = [float(d) for d in decays]
        self.sigma_rels = [float(s) for s in sigma_rels]
        if not all(0.0 <= d < 1.0 for d in self.decays):
            raise ValueError(f"EMA decays must lie in [0, 1), got {self.decays}")
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        if buffers not in BUFFER_MODES:
            raise ValueError(f"ema buffers must be one of {BUFFER_MODES}, got {buffers!r}")
        if tail_start is not None and tail_start < 0:
            raise ValueError(f"tail_start must be a step >= 0, got {tail_start}")
        if every < 1:
            raise ValueError(f"ema every must be >= 1, got {every}")
        if warmup not in (False, True, *WARMUPS):
            raise ValueError(f"ema warmup must be true, false or one of {WARMUPS}, got {warmup!r}")
        self.warmup = "tensorflow" if warmup is True else (warmup or None)
        self.every, self.flatten = int(every), flatten
        self.tail_start = tail_start
        self.labels = ([decay_label(d) for d in self.decays] + [sigma_rel_label(s) for s in self.sigma_rels]
                       + ([TAIL_LABEL] if tail_start is not None else []))
        self.step = 0
        state = model.state_dict(keep_vars=True)
        param_names = {name for name, _ in model.named_parameters()}
        averaged = lambda k, v: v.is_floating_point() and (k in param_names or buffers == "average")  # noqa: E731
        self.keys = list(state)
        self.avg_keys = [k for k, v in state.items() if averaged(k, v)]
        self.copy_keys = [k for k in self.keys if k not in set(self.avg_keys)]
        # Where each tensor lives in the module (its owner's _parameters or _buffers dict): the module's current
        # tensors are read from there, so a tensor replaced by load_state_dict(assign=True) is seen at once.
        self._owners = [_owner(model, k) for k in self.avg_keys + self.copy_keys]
        self._bind()
        live = self._live()
        if len({(t.dtype, t.device) for t in self._sources}) > 1:
            raise ValueError("EMA expects every averaged tensor on one device with one dtype")
        self._flat = live.unsqueeze(0).repeat(len(self.labels), 1)
        self._weights = torch.zeros(len(self.labels), 1, dtype=live.dtype, device=live.device)
        self._last_weights: list[float] = []
        sizes = [t.numel() for t in self._sources]
        # shadows[i] are views of row i of one (averages x numel) buffer, shaped like the weights.
        self.shadows = [[v.view_as(t) for v, t in zip(row.split(sizes), self._sources)] for row in self._flat]
        self.copies = [[t.detach().clone() for t in self._copy_sources] for _ in self.labels]
        self._flat_copies = [t for copy in self.copies for t in copy]

    def _bind(self) -> None:
        """Read the module's current tensors and, with ``flatten``, re-seat the averaged ones as views of one flat
        buffer (the module keeps the same Parameter objects, so optimisers built before are unaffected; only their
        storage moves). Records each tensor and its storage address for :meth:`_in_place`."""
        current = [table[name] for table, name in self._owners]
        n = len(self.avg_keys)
        averaged = current[:n]
        self._live_flat = None
        if self.flatten and averaged and len({(t.dtype, t.device) for t in averaged}) == 1:
            flat = torch.cat([t.detach().reshape(-1) for t in averaged])
            for t, view in zip(averaged, flat.split([t.numel() for t in averaged])):
                t.data = view.view_as(t)
            self._live_flat = flat
        self._tensors = current
        self._ptrs = [t.data_ptr() for t in current]
        self._sources = [t.detach() for t in averaged]
        self._copy_sources = [t.detach() for t in current[n:]]
        self._flat_copy_sources = self._copy_sources * len(self.labels)

    def _in_place(self) -> bool:
        """Whether every tracked tensor is still the module's, at the storage it had when bound."""
        current = [table[name] for table, name in self._owners]
        return all(map(operator.is_, current, self._tensors)) and \
            list(map(torch.Tensor.data_ptr, current)) == self._ptrs

    def _live(self) -> torch.Tensor:
        """The live model's averaged tensors as one vector: the flat buffer itself while every tensor is still its
        view. Any tensor replaced (``load_state_dict(..., assign=True)``), re-pointed (``p.data = ...``) or moved
        (``model.to(...)``) since: bind the module's current tensors again (re-seating them) and read those."""
        if not self._in_place():
            self._bind()
        if self._live_flat is not None:
            return self._live_flat
        if not self._sources:
            return torch.zeros(0)
        return torch.cat([t.reshape(-1) for t in self._sources])

    def decay_at(self, decay: float, step: int) -> float:
        """The decay used for the update that follows optimiser step ``step`` (0-based)."""
        if self.warmup == "tensorflow":
            return min(decay, (1 + step) / (10 + step))
        if self.warmup == "timm":
            return min(decay, 1.0 - (1.0 + step / TIMM_WARMUP_GAMMA) ** -TIMM_WARMUP_POWER)
        return decay

    def tail_weight_at(self, step: int) -> float:
        """The lerp weight of the tail average for the update that follows step ``step``: ``1 / (n + 1)``."""
        return 1.0 / (max(step - self.tail_start, 0) // self.every + 1)

    @torch.no_grad()
    def update(self) -> None:
        """Call after every optimiser step: folds the live weights into every average (every ``every`` steps)."""
        step = self.step
        self.step += 1
        if self.step % self.every:
            return
        weights = [1.0 - self.decay_at(d, step) ** self.every for d in self.decays]
        weights += [power_ema_weight(g, self.step, self.every) for g in self.gammas]
        if self.tail_start is not None:
            weights.append(self.tail_weight_at(step))
        if weights != self._last_weights:  # constant after warm-up: skip the host-to-device copy
            host = torch.tensor(weights, dtype=self._weights.dtype).unsqueeze(1)
            if self._weights.is_cuda:  # power EMAs change their weights every step: copy without a host sync (the
                host = host.pin_memory()  # caching host allocator keeps the pinned block until the copy is done)
            self._weights.copy_(host, non_blocking=self._weights.is_cuda)
            self._last_weights = weights
        live = self._live()
        if self._sources:
            self._flat.lerp_(live.expand_as(self._flat), self._weights)
        if self._flat_copies:
            torch._foreach_copy_(self._flat_copies, self._flat_copy_sources)

    def profile(self, index: int) -> dict[str, float | int]:
        """What average ``labels[index]`` is, for checkpoint metadata: ``{"ema_decay": d}``,
        ``{"sigma_rel": s, "gamma": g}`` or ``{"tail_start": step}``."""
        if index < len(self.decays):
            return {"ema_decay": self.decays[index]}
        index -= len(self.decays)
        if index < len(self.sigma_rels):
            return {"sigma_rel": self.sigma_rels[index], "gamma": self.gammas[index]}
        return {"tail_start": self.tail_start}

    def state_dict_for(self, index: int) -> dict[str, torch.Tensor]:
        """The averaged model ``labels[index]`` as a model state dict (shares memory with the average).

        Indices are the decays in order, then the power-function EMAs; the tail average, when kept, comes last.
        """
        state = dict(zip(self.avg_keys, self.shadows[index]))
        state.update(zip(self.copy_keys, self.copies[index]))
        return {k: state[k] for k in self.keys}

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every average as flat named tensors, for checkpoints (see :meth:`load_tensors`)."""
        out = {}
        for i in range(len(self.labels)):
            out.update({f"ema.{i}.{k}": v for k, v in self.state_dict_for(i).items()})
        return out

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor], step: int) -> None:
        for i in range(len(self.labels)):
            for k, dst in self.state_dict_for(i).items():
                dst.copy_(tensors[f"ema.{i}.{k}"])
        self.step = step


def _owner(model: nn.Module, key: str) -> tuple[dict, str]:
    """The dict (a module's ``_parameters`` or ``_buffers``) and the name under which state-dict entry ``key``
    lives."""
    path, _, name = key.rpartition(".")
    module = model.get_submodule(path)
    return (module._parameters if name in module._parameters else module._buffers), name


def decay_label(decay: float) -> str:
    """A stable short name for a decay, used in metric names and file names: ``0.9995 -> ema0.9995``."""
    return f"ema{decay:g}"


def sigma_rel_label(sigma_rel: float) -> str:
    """The name of a power-function EMA in metric and file names: ``0.05 -> sigma_rel0.05``."""
    return f"sigma_rel{sigma_rel:g}"
