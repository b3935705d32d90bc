"""Model soups and their baselines as pure functions of state dicts and tensors.

- Uniform and greedy soups: Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned models
  improves accuracy without increasing inference time" (ICML), Recipe 1 (uniform) and Recipe 2 / Algorithm 1 (greedy).
- Greedy soup in a random order and the pruned soup: Sobral, Dansereau, Bhogal, Zalai, "ModelSoup" study
  (Polytechnique Montreal), recipes "greedy random" and "pruned".
- WiSE-FT: Wortsman et al. 2022, "Robust fine-tuning of zero-shot models" (CVPR), Eq. 1:
  ``theta_alpha = (1 - alpha) * theta_0 + alpha * theta_1``.
- Output-space baselines: the logit ensemble and hard (majority) voting.

A state is a ``dict[str, Tensor]``. Floating-point tensors are averaged; integer buffers (BatchNorm's
``num_batches_tracked``) cannot be averaged meaningfully and are taken from the first state seen. Every soup is built
from a :class:`RunningSum`, so adding or removing one ingredient costs one pass over one model, never a re-average of
the whole selection. Selection never sees data: it calls a ``score(state) -> float`` the caller builds on the
validation split (higher is better).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch

State = Mapping[str, torch.Tensor]
Score = Callable[[State], float]


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    """Sums of half-precision weights are kept in float32 (a sum of 16 bf16 tensors loses digits); float32 and
    float64 keep their own precision, which for soups of tens of ingredients is far below the weights' noise."""
    return torch.promote_types(dtype, torch.float32)


class RunningSum:
    """The sum of the floating-point tensors of a multiset of states, and its mean (a soup) in one model's memory.

    ``mean(plus=s)`` / ``mean(minus=s)`` give the soup with ``s`` added or removed without changing the sum: the
    candidate a greedy or pruned step scores. :meth:`add` / :meth:`remove` then commit the step.
    """

    def __init__(self, template: State):
        self.keys = [k for k, v in template.items() if v.is_floating_point()]
        self.dtypes = {k: template[k].dtype for k in self.keys}
        self.fixed = {k: v.clone() for k, v in template.items() if not v.is_floating_point()}
        self.order = list(template)
        self.total = [torch.zeros_like(template[k], dtype=_accumulator(template[k].dtype)) for k in self.keys]
        self.count = 0

    def _floats(self, state: State) -> list[torch.Tensor]:
        return [state[k] for k in self.keys]

    def add(self, state: State) -> None:
        torch._foreach_add_(self.total, self._floats(state))
        self.count += 1

    def remove(self, state: State) -> None:
        if self.count < 1:
            raise ValueError("cannot remove from an empty soup")
        torch._foreach_sub_(self.total, self._floats(state))
        self.count -= 1

    def buffers(self) -> list[torch.Tensor]:
        """Scratch tensors shaped like the sum, for :meth:`mean`'s ``out``: a selecting recipe scores many candidates,
        and writing each into the same memory spares an allocation (and its page faults) of a whole model per step."""
        return [torch.empty_like(t) for t in self.total]

    def mean(self, plus: State | None = None, minus: State | None = None,
             out: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The average of the multiset, with ``plus`` added and/or ``minus`` removed for this call only.

        ``out`` (from :meth:`buffers`) receives the result, which then aliases it: it stays valid until ``out`` is
        passed again. Without ``out`` the result is new memory.
        """
        count = self.count + (plus is not None) - (minus is not None)
        if count < 1:
            raise ValueError("the mean of an empty soup is undefined")
        averaged = self.buffers() if out is None else out
        if plus is not None:
            # One pass per tensor: total + plus straight into the output.
            for target, total, extra in zip(averaged, self.total, self._floats(plus)):
                torch.add(total, extra, out=target)
        else:
            torch._foreach_copy_(averaged, self.total)
        if minus is not None:
            torch._foreach_sub_(averaged, self._floats(minus))
        torch._foreach_div_(averaged, float(count))
        floats = {k: v.to(self.dtypes[k]) for k, v in zip(self.keys, averaged)}
        return {k: floats[k] if k in floats else self.fixed[k] for k in self.order}


def uniform_soup(states: Iterable[State]) -> dict[str, torch.Tensor]:
    """Recipe 1 of model soups: ``(1/N) sum_i theta_i``, streaming.

    ``states`` may be a generator that loads one checkpoint at a time: only the running sum, the current state and
    the result are alive at once, so peak memory does not grow with the number of ingredients.
    """
    soup = None
    for state in states:
        if soup is None:
            soup = RunningSum(state)
        soup.add(state)
    if soup is None:
        raise ValueError("uniform_soup needs at least one state")
    return soup.mean()


def streamed_uniform_soup(keys: Sequence[str], read: Callable[[int, str], torch.Tensor],
                          count: int) -> dict[str, torch.Tensor]:
    """Recipe 1 streamed one tensor at a time: ``read(i, key)`` loads tensor ``key`` of ingredient ``i`` (from a
    memory-mapped file), so peak memory is the soup plus one tensor and a running sum, whatever ``count``."""
    from mergelab.merging.task_vectors import mean, merge_state

    return merge_state(keys, read, count, lambda key, tuned: mean(tuned))


def _improves(new: float, old: float, strict: bool) -> bool:
    """The model-soups acceptance test: ``new >= old`` (the paper), or ``new > old`` when ``strict``."""
    return new > old if strict else new >= old


@dataclass
class Selection:
    """What a selecting recipe returns: the chosen indices (in the order they entered or remained), the soup's
    state and score, and the score after every accepted step (``trace[k]`` = the soup after step ``k``)."""

    selected: list[int]
    state: dict[str, torch.Tensor]
    score: float
    trace: list[tuple[list[int], float]] = field(default_factory=list)


def greedy_soup(get: Callable[[int], State], order: Sequence[int], score: Score, *, strict: bool = False,
                passes: int = 1, max_ingredients: int | None = None,
                on_accept: Callable[[list[int], State], None] | None = None) -> Selection:
    """Recipe 2 of model soups (Algorithm 1): start from ``order[0]``; for each next ingredient, keep it if the
    soup with it scores at least as well as the soup without it (``>``: ``strict``).

    The paper sorts ``order`` by decreasing validation accuracy; a random order gives the "greedy random" recipe.
    ``passes > 1`` sweeps the rejected ingredients again in the same order (a soup that changed may now accept
    them); it stops early after a pass that adds nothing. Each ingredient enters at most once.
    ``max_ingredients`` caps the soup's size. ``get(i)`` returns ingredient ``i``'s state; ``on_accept(selected,
    state)`` is called with each accepted soup (for curves), never with a rejected one; that state is
    overwritten by later steps, so copy it to keep it. ``score`` gets the same kind of short-lived candidate.
    """
    if not order:
        raise ValueError("greedy_soup needs at least one ingredient")
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    limit = len(order) if max_ingredients is None else max_ingredients
    first = get(order[0])
    soup = RunningSum(first)
    soup.add(first)
    selected = [order[0]]
    # Two buffers: the accepted soup and the candidate being scored; an accepted candidate swaps them.
    kept, spare = soup.buffers(), soup.buffers()
    state = soup.mean(out=kept)
    best = score(state)
    trace = [(list(selected), best)]
    if on_accept:
        on_accept(list(selected), state)
    for _ in range(passes):
        grew = False
        for index in order:
            if len(selected) >= limit:
                break
            if index in selected:
                continue
            ingredient = get(index)
            candidate = soup.mean(plus=ingredient, out=spare)
            value = score(candidate)
            if _improves(value, best, strict):
                soup.add(ingredient)
                selected.append(index)
                state, best, grew = candidate, value, True
                kept, spare = spare, kept
                trace.append((list(selected), best))
                if on_accept:
                    on_accept(list(selected), state)
        if not grew or len(selected) >= limit:
            break
    return Selection(selected, state, best, trace)


def pruned_soup(get: Callable[[int], State], order: Sequence[int], score: Score, *, strict: bool = False,
                passes: int = 1, min_ingredients: int = 1) -> Selection:
    """The pruned soup (ModelSoup study): start from the uniform soup of every ingredient in ``order`` and remove
    ingredients, one at a time, while the score does not drop.

    The rule, exactly: visit the ingredients in ``order`` (the caller passes increasing validation accuracy, worst
    first); remove an ingredient if the soup without it scores ``>=`` the current soup (``>``: ``strict``), never
    going below ``min_ingredients``; ``passes`` repeats the sweep over the remaining ones, stopping early after a
    pass that removes nothing. ``selected`` lists the remaining ingredients in ``order``.
    """
    if not order:
        raise ValueError("pruned_soup needs at least one ingredient")
    if passes < 1 or min_ingredients < 1:
        raise ValueError(f"passes and min_ingredients must be >= 1, got {passes} and {min_ingredients}")
    soup = None
    for index in order:
        ingredient = get(index)
        if soup is None:
            soup = RunningSum(ingredient)
        soup.add(ingredient)
    kept = list(order)
    current_buffers, spare = soup.buffers(), soup.buffers()  # as in greedy_soup: the current soup and a candidate
    state = soup.mean(out=current_buffers)
    current = score(state)
    trace = [(list(kept), current)]
    for _ in range(passes):
        shrank = False
        for index in list(kept):
            if len(kept) <= min_ingredients:
                break
            ingredient = get(index)
            candidate = soup.mean(minus=ingredient, out=spare)
            value = score(candidate)
            if _improves(value, current, strict):
                soup.remove(ingredient)
                kept.remove(index)
                state, current, shrank = candidate, value, True
                current_buffers, spare = spare, current_buffers
                trace.append((list(kept), current))
        if not shrank:
            break
    return Selection(kept, state, current, trace)


def interpolate(theta0: State, theta1: State, alpha: float) -> dict[str, torch.Tensor]:
    """WiSE-FT, Eq. 1: ``(1 - alpha) * theta0 + alpha * theta1`` for floating-point tensors (one foreach lerp);
    integer buffers come from ``theta1``."""
    keys = [k for k, v in theta1.items() if v.is_floating_point()]
    mixed = dict(zip(keys, torch._foreach_lerp([theta0[k] for k in keys], [theta1[k] for k in keys], float(alpha))))
    return {k: mixed.get(k, v) for k, v in theta1.items()}


def wiseft(theta0: State, theta1: State, alphas: Sequence[float], score: Score) -> tuple[float, dict, list]:
    """WiSE-FT's mixing coefficient chosen by ``score`` over the grid ``alphas``.

    Returns ``(alpha, state, curve)`` with ``curve = [(alpha, score), ...]``. Ties go to the larger alpha (the
    model closer to the fine-tuned one).
    """
    if not alphas:
        raise ValueError("wiseft needs at least one alpha")
    curve, best = [], None
    for alpha in sorted(float(a) for a in alphas):
        state = interpolate(theta0, theta1, alpha)
        value = score(state)
        curve.append((alpha, value))
        if best is None or value >= best[1]:
            best = (alpha, value, state)
    return best[0], best[2], curve


def logit_ensemble(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """The output-space ensemble: the mean of the members' logits (N x classes each). Costs one forward pass per
    member at inference."""
    if not logits:
        raise ValueError("an ensemble needs at least one member")
    return torch.stack(list(logits)).mean(0)


def hard_vote(predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Majority vote over members: ``predictions`` is members x N class indices; ties go to the smallest class
    index (deterministic, independent of the members' order)."""
    votes = torch.nn.functional.one_hot(predictions.long(), num_classes).sum(0)
    return votes.argmax(1)
