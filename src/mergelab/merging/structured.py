"""Alignment solvers that keep a unit graph's structure: attention heads, GroupNorm groups, concatenated axes.

A structured group (:class:`~mergelab.models.graph.Blocks`) may only be permuted by moving its blocks as wholes, by
its parent group's permutation, and permuting inside each block; a fused attention projection's output axis is the
concatenation ``(qk, qk, vo)`` of its groups' units (:meth:`UnitGraph.slices`). The unstructured solvers of
:mod:`mergelab.merging.align`, :mod:`mergelab.merging.otfusion` and :mod:`mergelab.merging.zipit` read neither;
the merge engine calls :func:`match` (the one entry point) instead of the method's own ``match`` for graphs with
``graph.structured``, and merges the permutation zips it returns like any other.

The assignment keeps the structure exactly. For a parent group ``P`` (e.g. the heads) with children ``C`` (e.g.
``qk`` and ``vo``), each child's similarity matrix ``S_c`` (A's units x B's units) is cut into blocks; the value of
matching A's block ``h`` to B's block ``h'`` is ``sum_c max_sigma <S_c[h, h'], sigma>``, the best within-block
assignment summed over the children (plus ``S_P[h, h']`` when the parent has axes of its own). Blocks are assigned
by a linear assignment on those values, then units inside each matched pair of blocks by the within-block optimum,
which together maximise ``sum_c <S_c, P_c>`` over structured permutations (the block-level problem is exact
because the within-block optima of different block pairs are independent). Children whose blocks stay in place
(``parent=None``) are matched inside each diagonal block.

- :func:`weight_matching`: Git Re-Basin weight matching (Ainsworth et al. 2023, Algorithm 1), coordinate descent
  over families (a group with its children), the objective summed over every slice of every parameter.
- :func:`activation_matching`: per family, the correlation of A's and B's features (Sec. 3.1).
- :func:`ot_permutations`: OT fusion (Singh & Jaggi 2020) with the exact EMD solver and uniform marginals of equal
  widths, whose optimal plan is a permutation matrix (Birkhoff): the ground metric per group (Euclidean distance
  between incoming weight rows, past-corrected in forward order, or between activation vectors), and ``ot.emd`` at
  the block level and within blocks. Soft plans (Sinkhorn, unequal widths) on structured groups are refused.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import ot
import torch

from mergelab.errors import UserError
from mergelab.merging.align import solve_assignment
from mergelab.merging.features import FeatureStats
from mergelab.models.graph import Group, UnitGraph, axis_index

State = Mapping[str, torch.Tensor]


def families(graph: UnitGraph) -> list[tuple[Group, list[Group]]]:
    """``(group, children)`` for every group that is nobody's child, in graph order; a parent-less structured group
    is its own family with itself as the only child (its blocks stay in place)."""
    children: dict[Group | None, list[Group]] = {}
    for group, spec in graph.blocks.items():
        children.setdefault(spec.parent, []).append(group)
    for group, spec in graph.blocks.items():
        if spec.parent is not None and spec.parent in graph.blocks:
            raise UserError(f"structured alignment: nested blocks ({group} inside {spec.parent}) are not supported")
    out = [(group, children.get(group, [])) for group in graph.groups if group not in graph.blocks]
    out += [(group, [group]) for group in children.get(None, [])]
    return out


def _solve(score: torch.Tensor, solver: str) -> tuple[torch.Tensor, float]:
    """``perm`` maximising ``sum_i score[i, perm[i]]`` and that maximum; ``solver="emd"`` solves it as exact OT
    with uniform marginals (``ot.emd`` on ``-score``)."""
    if solver == "lap":
        perm = solve_assignment(score)
    else:
        n = score.shape[0]
        cost = (score.max() - score).detach().cpu().double().numpy()
        plan = ot.emd(np.full(n, 1.0 / n), np.full(n, 1.0 / n), cost, numItermax=1_000_000)
        perm = torch.from_numpy(plan.argmax(1)).long()
        if not torch.equal(perm.sort().values, torch.arange(n)):
            raise UserError("OT fusion: the EMD plan of a structured group is not a permutation")
    rows = torch.arange(len(perm))
    return perm, float(score[rows, perm].sum())


def assign(graph: UnitGraph, scores: Mapping[Group, torch.Tensor], groups: Iterable[Group] | None = None,
           solver: str = "lap") -> dict[Group, torch.Tensor]:
    """Structured permutations maximising ``sum_g <scores[g], P_g>`` (module docstring), for the families of
    ``groups`` (default: all). ``scores[g]`` is n x n (A's units x B's units); a group without a score (a heads
    group without axes) gets value 0 of its own."""
    wanted = None if groups is None else set(groups)
    perms: dict[Group, torch.Tensor] = {}
    for group, children in families(graph):
        if wanted is not None and group not in wanted:
            continue
        if not children:
            perms[group] = _solve(scores[group], solver)[0]
            continue
        count = graph.blocks[children[0]].count
        own = scores.get(group) if group not in graph.blocks else None
        value = own.clone().double() if own is not None else torch.zeros(count, count, dtype=torch.float64)
        within: dict[tuple[Group, int, int], torch.Tensor] = {}
        fixed = graph.blocks.get(group) is not None and graph.blocks[group].parent is None
        for child in children:
            size = graph.groups[child] // count
            blocks = scores[child].double().reshape(count, size, count, size)
            for h in range(count):
                for k in ([h] if fixed else range(count)):
                    within[child, h, k], best = _solve(blocks[h, :, k, :], solver)
                    value[h, k] += best
        parent_perm = torch.arange(count) if fixed else _solve(value, solver)[0]
        if not fixed:
            perms[group] = parent_perm
        for child in children:
            size = graph.groups[child] // count
            perms[child] = torch.cat([parent_perm[h] * size + within[child, h, int(parent_perm[h])]
                                      for h in range(count)])
    return perms


def group_similarity(graph: UnitGraph, group: Group, state_a: State, state_b: State,
                     perms: Mapping[Group, torch.Tensor], keys: Iterable[str] | None = None) -> torch.Tensor:
    """``S[i, j] = sum <A unit i, B unit j>`` over every slice of ``group`` (:meth:`UnitGraph.slices`) of the
    ``keys`` (default: every floating-point key), B's other axes permuted by ``perms``: Algorithm 1's linear
    objective for one group (float64, n x n)."""
    n = graph.groups[group]
    allowed = None if keys is None else set(keys)
    similarity = torch.zeros(n, n, dtype=torch.float64)
    for key, axis, start in graph.slices(group):
        if allowed is not None and key not in allowed:
            continue
        a, b = state_a[key], state_b[key]
        if not a.is_floating_point():
            continue
        for other, entry in enumerate(graph.axes[key]):
            index = axis_index(graph, entry, perms) if other != axis else None
            if index is not None:
                b = b.index_select(other, index.to(b.device))
        a, b = (t.detach().cpu().double().narrow(axis, start, n).movedim(axis, 0).reshape(n, -1) for t in (a, b))
        similarity += a @ b.T
    return similarity


def weight_matching(graph: UnitGraph, state_a: State, state_b: State, *, keys: Iterable[str] | None = None,
                    max_iter: int = 100, seed: int = 0) -> dict[Group, torch.Tensor]:
    """Git Re-Basin weight matching (Algorithm 1) with structured families: coordinate descent from the identity,
    one family at a time in a random order per sweep, until no family improves. ``keys``: the state-dict keys in
    the objective (pass the parameters: running statistics are data, not weights)."""
    keys = list(keys) if keys is not None else None
    perms = {group: torch.arange(n) for group, n in graph.groups.items()}
    generator = torch.Generator().manual_seed(seed)
    fams = families(graph)
    for _ in range(max_iter):
        improved = False
        for index in torch.randperm(len(fams), generator=generator).tolist():
            group, children = fams[index]
            members = [group] if not children or group in children else [group, *children]
            scores = {g: group_similarity(graph, g, state_a, state_b, perms, keys) for g in members
                      if graph.slices(g)}
            candidate = assign(graph, scores, [group])
            old = sum(float(s[torch.arange(len(perms[g])), perms[g]].sum()) for g, s in scores.items())
            new = sum(float(s[torch.arange(len(candidate[g])), candidate[g]].sum()) for g, s in scores.items())
            if new - old > 1e-12 * max(1.0, sum(float(s.abs().sum()) for s in scores.values())):
                perms.update(candidate)
                improved = True
        if not improved:
            break
    return perms


def activation_matching(graph: UnitGraph, stats: Mapping[Group, FeatureStats], a: int = 0, b: int = 1
                        ) -> dict[Group, torch.Tensor]:
    """Git Re-Basin activation matching with structured families: the Pearson correlation of model ``a``'s and
    model ``b``'s features of every group, assigned by :func:`assign`."""
    missing = [g for g in graph.groups if g not in stats and graph.slices(g)]
    if missing:
        raise UserError(f"activation matching: no features of unit group {missing[0]}; align by weights")
    return assign(graph, {g: s.block(a, b) for g, s in stats.items()})


def _writer_rows(graph: UnitGraph, group: Group, state: State, perms: Mapping[Group, torch.Tensor],
                 ready: set[Group]) -> torch.Tensor | None:
    """The incoming weights of ``group``'s units: every slice on axis 0 of a linear/conv weight whose inputs are
    pixels or groups in ``ready`` (aligned already; for a residual stream, the writers met first, as
    :mod:`mergelab.merging.otfusion` does), its input axes reindexed by ``perms`` (OT's past correction), rows
    concatenated (float64)."""
    weights = {key for layer in graph.layers if layer.kind in ("linear", "conv") for key in layer.keys[:1]}
    rows = []
    n = graph.groups[group]
    for key, axis, start in graph.slices(group):
        inputs = {g for entry in graph.axes[key][1:] if entry is not None
                  for g in (entry if isinstance(entry, tuple) else (entry,))}
        if axis != 0 or key not in weights or not inputs <= ready:
            continue
        w = state[key].detach().cpu().double().narrow(0, start, n)
        for other, entry in enumerate(graph.axes[key][1:], 1):
            index = axis_index(graph, entry, perms)
            if index is not None:
                w = w.index_select(other, index)
        rows.append(w.reshape(n, -1))
    return torch.cat(rows, 1) if rows else None


def ot_permutations(graph: UnitGraph, state_a: State, state_b: State, *, alignment: str = "weights",
                    stats: Mapping[Group, FeatureStats] | None = None, a: int = 0, b: int = 1
                    ) -> dict[Group, torch.Tensor]:
    """OT fusion (exact EMD, uniform marginals) of a structured graph: per family in forward order, the ground
    metric ``M[i, j] = ||B_i - A_j||`` between incoming weight rows (B's inputs past-corrected by the plans found
    so far) or between activation vectors, and the structured EMD assignment minimising it."""
    perms: dict[Group, torch.Tensor] = {}
    order = []
    for layer in graph.layers:
        for entry in (layer.out_group if isinstance(layer.out_group, tuple) else (layer.out_group,)):
            if entry is not None and entry not in order:
                order.append(entry)
    order += [g for g in graph.groups if g not in order]
    done: set[Group] = set()
    for group in order:
        family = next((f for f in families(graph) if group == f[0] or group in f[1]), None)
        if family is None or family[0] in done:
            continue
        root, children = family
        done.add(root)
        members = [root] if not children or root in children else [root, *children]
        scores = {}
        for g in members:
            if alignment == "weights":
                rows_a = _writer_rows(graph, g, state_a, {}, set(perms))
                rows_b = _writer_rows(graph, g, state_b, perms, set(perms))
                if rows_a is None:
                    continue
                scores[g] = -torch.cdist(rows_a, rows_b)  # rows: A's units, columns: B's units
            else:
                if g not in stats:
                    continue
                scores[g] = -stats[g].sq_distances(a, b).sqrt()
        if not scores and root not in graph.blocks and not children:
            raise UserError(f"OT fusion: unit group {root} has no incoming weights or features to measure")
        perms.update(assign(graph, scores, [root], solver="emd"))
    return perms


def match(method, graph: UnitGraph, models, stats: Mapping[Group, FeatureStats] | None, anchor: int) -> dict:
    """The merge engine's step 1 for a structured graph (:func:`mergelab.merging.engine.match` calls it when
    ``graph.structured``): every model permuted onto the anchor by ``method`` with the structure kept, as a
    permutation zip per group. ``merge=permute``: weight matching (parameters only) or activation matching;
    ``merge=ot``: exact-EMD OT fusion by weights or activations (its plans are permutations); ``merge=zipit``:
    :func:`zip_groups`."""
    from mergelab.merging.engine import permutation_zip

    states = [m.state_dict() for m in models]
    if method.name == "zipit":
        if len(models) != 2:
            raise UserError("ZipIt! of a model with attention heads or norm groups merges two models")
        return zip_groups(graph, stats, alpha=method.alpha, beta=method.beta, budget_rule=method.budget_rule)
    if method.name == "ot":
        if method.solver != "emd" or method.marginals != "uniform" or not method.rescale_plan:
            raise UserError("OT fusion of a model with attention heads or norm groups needs merge.solver=emd, "
                            "merge.marginals=uniform and merge.rescale_plan=true (its plans are permutations)")
    elif method.name != "permute":
        raise UserError(f"merge={method.name} cannot align a model with attention heads or norm groups; "
                        "use merge=permute, merge=ot or merge=zipit")
    params = [name for name, _ in models[0].named_parameters()]
    perms = []
    for k in range(len(models)):
        if k == anchor:
            perms.append({group: torch.arange(n) for group, n in graph.groups.items()})
        elif method.name == "ot":
            perms.append(ot_permutations(graph, states[anchor], states[k], alignment=method.alignment, stats=stats,
                                         a=anchor, b=k))
        elif method.alignment == "weights":
            perms.append(weight_matching(graph, states[anchor], states[k], keys=params, max_iter=method.max_iter,
                                         seed=method.seed))
        else:
            perms.append(activation_matching(graph, stats, anchor, k))
    return {group: permutation_zip([p[group] for p in perms]) for group in graph.groups}


def zip_groups(graph: UnitGraph, stats: Mapping[Group, FeatureStats], *, alpha: float, beta: float,
               budget_rule: str = "original") -> dict:
    """ZipIt! matching of a structured graph: plain groups are zipped as the paper does
    (:func:`mergelab.merging.zipit.zip_groups`); a structured family cannot merge features freely (two dims of one
    head with each other, or across heads), so its groups are matched one to one between the two models by
    :func:`activation_matching` and zipped as that permutation (heads as wholes, dims within heads)."""
    from mergelab.merging.engine import permutation_zip
    from mergelab.merging.zipit import zip_groups as zip_plain

    structured_groups = {g for root, children in families(graph) if children for g in (root, *children)}
    zips = zip_plain({g: s for g, s in stats.items() if g not in structured_groups}, alpha=alpha, beta=beta,
                     budget_rule=budget_rule)
    if any(g in structured_groups for g in stats):
        perms = activation_matching(graph, stats, 0, 1)
        zips.update({g: permutation_zip([torch.arange(graph.groups[g]), perms[g]])
                     for g in structured_groups if g in perms})
    return zips
