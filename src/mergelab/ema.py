"""Exponential moving averages of a model's weights, for several decays at once.

``shadow <- decay * shadow + (1 - decay) * weight`` after every optimiser step, for every decay of the study in the
same run. All averages share one ``(averages x weights)`` buffer updated by a single broadcast ``lerp_``, so a step
costs one concatenation of the live weights and one kernel, not a Python loop over parameters or decays (timm's
ModelEmaV3 uses one ``torch._foreach_lerp_`` for one decay; on CPU, per-tensor dispatch, even through ``_foreach``,
costs more than the arithmetic for small models).

Optionally the same sweep also keeps a uniform *tail average* (the SWA-style baseline of Izmailov et al., 2018,
here over every step rather than every epoch): from step ``tail_start`` on, the equal-weight mean of the weights
after each step. It is one more entry in the lerp with weight ``1 / (n + 1)`` at its ``n``-th folded step, which is
exactly the running mean ``mean_n+1 = mean_n + (w - mean_n) / (n + 1)``; before ``tail_start`` its weight is 1, so
it follows the live weights and starts from them.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

BUFFER_MODES = ("average", "copy")
TAIL_LABEL = "tail"


class EMA:
    """Moving averages of ``model``'s floating-point state for each decay in ``decays``.

    Args:
        decays: one or several decays in [0, 1).
        warmup: use ``min(decay, (1 + t) / (10 + t))`` at step t (the TensorFlow/timm schedule), so early
            averages are not dominated by the random initialisation.
        buffers: what the averaged model holds for floating-point buffers (BatchNorm running statistics):
            ``"average"`` averages them like weights; ``"copy"`` copies the live model's. Integer buffers
            (``num_batches_tracked``) are always copied. Either way, :func:`mergelab.evaluation.recompute_bn`
            can recompute the statistics for the averaged weights before evaluation.
        tail_start: if not None, also keep the uniform average of the weights after every step from this
            (0-based) optimiser step on; it is the last average, after the decays, labelled ``tail``.
        every: fold the weights in every ``every`` steps with decay ``decay ** every``, which keeps the averaging
            horizon (in steps) and divides the cost; 1 (the default) is the exact per-step recursion.
        flatten: re-seat the model's averaged tensors as views of one contiguous buffer (see
            :meth:`_flatten_sources`), so that an update reads them without a copy.
    """

    def __init__(self, model: nn.Module, decays: Iterable[float], warmup: bool = False, buffers: str = "average",
                 tail_start: int | None = None, every: int = 1, flatten: bool = True):
        self.decays = [float(d) for d in decays]
        if not all(0.0 <= d < 1.0 for d in self.decays):
            raise ValueError(f"EMA decays must lie in [0, 1), got {self.decays}")
        if buffers not in BUFFER_MODES:
            raise ValueError(f"ema buffers must be one of {BUFFER_MODES}, got {buffers!r}")
        if tail_start is not None and tail_start < 0:
            raise ValueError(f"tail_start must be a step >= 0, got {tail_start}")
        if every < 1:
            raise ValueError(f"ema every must be >= 1, got {every}")
        self.warmup, self.every = warmup, int(every)
        self.tail_start = tail_start
        self.labels = [decay_label(d) for d in self.decays] + ([TAIL_LABEL] if tail_start is not None else [])
        self.step = 0
        state = model.state_dict(keep_vars=True)
        param_names = {name for name, _ in model.named_parameters()}
        averaged = lambda k, v: v.is_floating_point() and (k in param_names or buffers == "average")  # noqa: E731
        self.keys = list(state)
        self.avg_keys = [k for k, v in state.items() if averaged(k, v)]
        self.copy_keys = [k for k in self.keys if k not in set(self.avg_keys)]
        self._module_tensors = [state[k] for k in self.avg_keys]
        self._sources = [state[k].detach() for k in self.avg_keys]
        self._copy_sources = [state[k].detach() for k in self.copy_keys]
        # shadows[i] are views of row i of one (averages x numel) buffer, shaped like the weights.
        sizes = [t.numel() for t in self._sources]
        if len({(t.dtype, t.device) for t in self._sources}) > 1:
            raise ValueError("EMA expects every averaged tensor on one device with one dtype")
        live = self._flatten_sources(state) if flatten else self._live()
        self._flat = live.unsqueeze(0).repeat(len(self.labels), 1)
        self._weights = torch.zeros(len(self.labels), 1, dtype=live.dtype, device=live.device)
        self._last_weights: list[float] = []
        self.shadows = [[v.view_as(t) for v, t in zip(row.split(sizes), self._sources)] for row in self._flat]
        self.copies = [[t.clone() for t in self._copy_sources] for _ in self.labels]
        self._flat_copies = [t for copy in self.copies for t in copy]
        self._flat_copy_sources = self._copy_sources * len(self.labels)

    def _flatten_sources(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """Move the live averaged tensors into one contiguous buffer, each becoming a view of it; return the buffer.

        The module keeps the same Parameter objects (so optimisers built before are unaffected); only their storage
        moves. Every update then reads the live weights as one vector instead of concatenating them.
        """
        if not self._sources:
            return torch.zeros(0)
        flat = torch.cat([t.reshape(-1) for t in self._sources])
        for key, view in zip(self.avg_keys, flat.split([t.numel() for t in self._sources])):
            state[key].data = view.view_as(state[key])
        self._sources = [state[k].detach() for k in self.avg_keys]
        self._live_flat = flat
        self._first_live = state[self.avg_keys[0]]  # the module's own tensor: its storage tells if views still hold
        return flat

    def _live(self) -> torch.Tensor:
        """The live model's averaged tensors as one vector (no copy while they still share the flat buffer)."""
        if not self._sources:
            return torch.zeros(0)
        flat = getattr(self, "_live_flat", None)
        if flat is not None and self._first_live.data_ptr() == flat.data_ptr():
            return flat
        # The module's tensors moved (to another device, or into another EMA's flat buffer): read them as they are.
        return torch.cat([t.detach().reshape(-1) for t in self._module_tensors])

    def decay_at(self, decay: float, step: int) -> float:
        """The decay used for the update that follows optimiser step ``step`` (0-based)."""
        return min(decay, (1 + step) / (10 + step)) if self.warmup else decay

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
        if self.tail_start is not None:
            weights.append(self.tail_weight_at(step))
        if weights != self._last_weights:  # constant after warm-up: skip the host-to-device copy
            self._weights.copy_(torch.tensor(weights).unsqueeze(1))
            self._last_weights = weights
        if self._sources:
            self._flat.lerp_(self._live().expand_as(self._flat), self._weights)
        if self._flat_copies:
            torch._foreach_copy_(self._flat_copies, self._flat_copy_sources)

    def state_dict_for(self, index: int) -> dict[str, torch.Tensor]:
        """The averaged model ``labels[index]`` as a model state dict (shares memory with the average).

        Indices ``0 .. len(decays) - 1`` are the decays in order; the tail average, when kept, comes last.
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


def decay_label(decay: float) -> str:
    """A stable short name for a decay, used in metric names and file names: ``0.9995 -> ema0.9995``."""
    return f"ema{decay:g}"
