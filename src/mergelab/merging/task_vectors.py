"""Task-vector merging of models fine-tuned from one pretrained model, as pure functions, one tensor at a time.

A task vector is ``tau_i = theta_i - theta_0``: fine-tuned minus pretrained weights. Every method here maps the
pretrained tensor ``base`` and the fine-tuned tensors ``tuned`` (one per model, same key) to the merged tensor, so a
merge can stream a model key by key: ``tuned`` may be any sequence that reads ``tuned[i]`` from disk on access
(:class:`LazyTensors`), and every function walks it with running sums, never stacking the N tensors, so memory per
key is a few tensors whatever N.

- Task arithmetic: Ilharco et al. 2023, "Editing models with task arithmetic" (ICLR), Sec. 2:
  ``theta = theta_0 + lambda * sum_i tau_i``.
- TIES-Merging: Yadav et al. 2023, "Resolving interference when merging models" (NeurIPS), Algorithm 1: trim each
  tau_i to its top-k% magnitudes, elect the sign of each entry by the sign of the summed trimmed values ("mass"), and
  average only the trimmed values that agree with it (disjoint mean); ``theta = theta_0 + lambda * tau_m``.
  Trimming is per tensor here (as mergekit does), not over the flattened whole model as in the paper's code:
  per-tensor is what streaming allows; see docs/task_vectors.md.
- DARE: Yu et al. 2024, "Language models are Super Mario" (ICML), Eq. 2: drop each entry of tau_i with probability p
  and rescale the survivors by 1/(1-p), which keeps E[tau] unchanged; then merge linearly or with TIES' sign
  election and disjoint mean (without TIES' trimming, which DARE replaces).
- Model Stock: Jang et al. 2024, "Model Stock: all we need is just a few fine-tuned models" (ECCV), Eq. 4-5: per
  layer, ``t = N cos(theta) / (1 + (N-1) cos(theta))`` from the angle between the fine-tuned task vectors, and
  ``theta = t * mean_i theta_i + (1 - t) * theta_0``. For N > 2, cos(theta) is the mean pairwise cosine (the paper
  assumes equal angles; mergekit averages the pairs too).
- SLERP: spherical linear interpolation of two models' tensors (Shoemake 1985; mergekit's ``slerp``).
- Fisher merging: Matena & Raffel 2022, "Merging models with Fisher-weighted averaging" (NeurIPS), Eq. 3:
  ``theta = sum_i F_i theta_i / sum_i F_i`` with diagonal Fishers F_i.
- RegMean: Jin et al. 2023, "Dataless knowledge fusion by merging weights of language models" (ICLR), Eq. 2 and
  Sec. 3.3: for a linear layer with input Gram matrices ``G_i = X_i^T X_i``,
  ``W^T = (sum_i G~_i)^-1 sum_i G~_i W_i^T`` where ``G~ = alpha G + (1 - alpha) diag(G)`` shrinks the off-diagonal.
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable, Iterable, Mapping, Sequence

import torch

EPS = 1e-8


class LazyTensors(Sequence):
    """``tuned[i]`` = tensor ``key`` of model ``i``, read by ``read(i, key)`` when indexed (nothing is cached)."""

    def __init__(self, read: Callable[[int, str], torch.Tensor], count: int, key: str):
        self.read, self.count, self.key = read, count, key

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index):
        if not 0 <= index < self.count:
            raise IndexError(index)
        return self.read(index, self.key)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _vectors(base: torch.Tensor, tuned: Sequence[torch.Tensor]) -> Iterable[torch.Tensor]:
    """The task vectors tau_i = theta_i - theta_0, one at a time, in float32 or wider."""
    base = _f32(base)
    for i in range(len(tuned)):
        yield _f32(tuned[i]) - base


def task_arithmetic(base: torch.Tensor, tuned: Sequence[torch.Tensor], lam: float) -> torch.Tensor:
    """``theta_0 + lambda * sum_i tau_i`` (Ilharco et al. 2023), accumulated in place (no tensor per model)."""
    base32 = _f32(base)
    total = torch.zeros_like(base32)
    for i in range(len(tuned)):
        total.add_(tuned[i]).sub_(base32)
    return total.mul_(lam).add_(base32).to(base.dtype)


def trim_threshold(tau: torch.Tensor, k: float) -> float | None:
    """The smallest magnitude TIES keeps in ``tau``: the ``ceil(k * numel)``-th largest (None: keep everything).
    A Python number: ``kthvalue``'s result tensor keeps its whole workspace alive, one tensor per model."""
    if not 0 < k <= 1:
        raise ValueError(f"TIES keeps a fraction k in (0, 1], got {k}")
    keep = math.ceil(k * tau.numel())
    if keep >= tau.numel():
        return None
    flat = tau.abs().flatten()
    return flat.kthvalue(flat.numel() - keep + 1).values.item()


def _keep(tau: torch.Tensor, threshold: float | None) -> torch.Tensor:
    return tau if threshold is None else torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))


def trim(tau: torch.Tensor, k: float) -> torch.Tensor:
    """TIES step 1: keep the ``ceil(k * numel)`` largest magnitudes of ``tau`` (``0 < k <= 1``), zero the rest."""
    return _keep(tau, trim_threshold(tau, k))


def _disjoint_merge(base: torch.Tensor, sparse: Callable[[], Iterable[torch.Tensor]]) -> torch.Tensor:
    """TIES steps 2-3 over sparse task vectors: the elected sign (of the summed mass) and the mean of the entries
    that agree with it (zeros excluded). ``sparse()`` yields the sparse tau_i, and is walked twice."""
    mass = torch.zeros_like(_f32(base))
    for tau in sparse():
        mass += tau
    sign = torch.sign(mass)
    total, count = torch.zeros_like(mass), torch.zeros_like(mass)
    for tau in sparse():
        agree = (torch.sign(tau) == sign) & (tau != 0)
        total += torch.where(agree, tau, 0.0)
        count += agree
    return total / count.clamp(min=1)


def ties(base: torch.Tensor, tuned: Sequence[torch.Tensor], k: float, lam: float) -> torch.Tensor:
    """TIES-Merging (Yadav et al. 2023, Algorithm 1): trim to top-k%, elect sign, disjoint mean, scale by lambda."""
    thresholds: dict[int, float | None] = {}  # ranked once per model: the second pass reuses them

    def trimmed() -> Iterable[torch.Tensor]:
        for i, tau in enumerate(_vectors(base, tuned)):
            if i not in thresholds:
                thresholds[i] = trim_threshold(tau, k)
            yield _keep(tau, thresholds[i])

    merged = _disjoint_merge(base, trimmed)
    return (_f32(base) + lam * merged).to(base.dtype)


def dare_mask(shape: torch.Size, p: float, seed: int, index: int, key: str, device=None) -> torch.Tensor:
    """The keep-mask of DARE for model ``index``'s tensor ``key``: Bernoulli(1 - p), seeded by (seed, index, key) so a
    streamed merge draws the same mask whatever order tensors are read in."""
    digest = hashlib.sha256(f"{seed}/{index}/{key}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    return (torch.rand(shape, generator=generator) >= p).to(device)


def dare(base: torch.Tensor, tuned: Sequence[torch.Tensor], p: float, lam: float, *, combine: str = "linear",
         seed: int = 0, key: str = "") -> torch.Tensor:
    """DARE (Yu et al. 2024, Eq. 2): tau_i -> mask_i * tau_i / (1 - p), then ``linear`` (task arithmetic) or
    ``ties`` (sign election and disjoint mean) with scale lambda."""
    if not 0 <= p < 1:
        raise ValueError(f"DARE's drop rate p must be in [0, 1), got {p}")
    if combine not in ("linear", "ties"):
        raise ValueError(f"DARE combines linear or ties, got {combine!r}")

    def rescaled() -> Iterable[torch.Tensor]:
        for i, tau in enumerate(_vectors(base, tuned)):
            yield tau * dare_mask(tau.shape, p, seed, i, key, tau.device) / (1 - p)

    if combine == "linear":
        merged = torch.zeros_like(_f32(base))
        for tau in rescaled():
            merged += tau
    else:
        merged = _disjoint_merge(base, rescaled)
    return (_f32(base) + lam * merged).to(base.dtype)


def stock_ratio(cos: float | torch.Tensor, n: int) -> float | torch.Tensor:
    """Model Stock's interpolation ratio (Jang et al. 2024, Eq. 5): ``t = N cos / (1 + (N - 1) cos)``."""
    return n * cos / (1 + (n - 1) * cos)


def mean_pairwise_cosine(base: torch.Tensor, tuned: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean cosine over pairs i != j of task vectors, from one pass: with unit vectors u_i,
    ``sum_{i!=j} <u_i, u_j> = |sum_i u_i|^2 - N``."""
    n = len(tuned)
    if n < 2:
        raise ValueError("the angle between fine-tuned models needs at least two of them")
    total = torch.zeros_like(_f32(base)).flatten()
    for tau in _vectors(base, tuned):
        total += tau.flatten() / (tau.norm() + EPS)
    return ((total.square().sum() - n) / (n * (n - 1))).clamp(-1.0, 1.0)


def model_stock(base: torch.Tensor, tuned: Sequence[torch.Tensor]) -> torch.Tensor:
    """Model Stock (Jang et al. 2024, Eq. 4): ``t * mean_i theta_i + (1 - t) * theta_0`` with ``t`` from the angle
    between the fine-tuned task vectors of this layer (tensor)."""
    n = len(tuned)
    t = stock_ratio(mean_pairwise_cosine(base, tuned), n)
    average = torch.zeros_like(_f32(base))
    for i in range(n):
        average += _f32(tuned[i])
    average /= n
    return (t * average + (1 - t) * _f32(base)).to(base.dtype)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, *, dot_threshold: float = 0.9995) -> torch.Tensor:
    """Spherical interpolation from ``a`` (t=0) to ``b`` (t=1) along the great circle through their directions,
    magnitudes interpolated with the angle's sines; nearly parallel tensors fall back to the linear interpolation."""
    a32, b32 = _f32(a), _f32(b)
    cos = (a32.flatten() @ b32.flatten()) / (a32.norm() * b32.norm() + EPS)
    if cos.abs() > dot_threshold:
        return torch.lerp(a32, b32, t).to(a.dtype)
    omega = torch.arccos(cos.clamp(-1, 1))
    merged = (torch.sin((1 - t) * omega) * a32 + torch.sin(t * omega) * b32) / torch.sin(omega)
    return merged.to(a.dtype)


def fisher_merge(tuned: Sequence[torch.Tensor], fishers: Sequence[torch.Tensor], floor: float = 1e-6) -> torch.Tensor:
    """Fisher-weighted averaging (Matena & Raffel 2022, Eq. 3): ``sum_i F_i theta_i / sum_i F_i`` elementwise.
    ``floor`` is added to every Fisher (as the authors' code does) so entries with zero Fisher everywhere average
    uniformly instead of dividing by zero."""
    numerator, denominator = None, None
    for i in range(len(tuned)):
        weight = _f32(fishers[i]) + floor
        term = weight * _f32(tuned[i])
        numerator = term if numerator is None else numerator + term
        denominator = weight if denominator is None else denominator + weight
    return (numerator / denominator).to(tuned[0].dtype)


def shrink_gram(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """RegMean's regularised Gram ``alpha G + (1 - alpha) diag(G)`` (Jin et al. 2023, Sec. 3.3)."""
    return alpha * gram + (1 - alpha) * torch.diag_embed(torch.diagonal(gram))


def regmean(weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """RegMean for one linear map ``y = W x`` (W: out x in; a convolution's weight flattened to out x in*kh*kw):
    ``W^T = (sum_i G~_i)^-1 sum_i G~_i W_i^T`` with ``G_i = X_i^T X_i`` over model i's layer inputs, the
    closed-form minimiser of ``sum_i |X_i W^T - X_i W_i^T|^2`` (Jin et al. 2023, Eq. 2)."""
    shape, dtype = weights[0].shape, weights[0].dtype
    lhs, rhs = None, None
    for i in range(len(weights)):
        g = shrink_gram(grams[i].double(), alpha)
        w = weights[i].double().reshape(shape[0], -1)
        lhs = g if lhs is None else lhs + g
        rhs = g @ w.T if rhs is None else rhs + g @ w.T
    return torch.linalg.lstsq(lhs, rhs).solution.T.reshape(shape).to(dtype)


# --------------------------------------------------------------------------------------------- the streaming merge
def mean(tuned: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(1/N) sum_i theta_i`` by a running sum in place (float32 or wider), in the first tensor's dtype."""
    first = tuned[0]
    total = first.to(torch.promote_types(first.dtype, torch.float32), copy=True)
    dtype = first.dtype
    del first
    for i in range(1, len(tuned)):
        total.add_(tuned[i])
    return total.div_(len(tuned)).to(dtype)


def merge_state(keys: Sequence[str], read: Callable[[int, str], torch.Tensor], count: int,
                merge: Callable[[str, Sequence[torch.Tensor]], torch.Tensor]) -> dict[str, torch.Tensor]:
    """The merged state, built one key at a time: ``merge(key, LazyTensors(read, count, key))``.

    ``read(i, key)`` loads one tensor of model ``i`` (copied out of a memory-mapped file); nothing of another key is
    held while a key is merged, so peak memory is the output plus a few tensors of one key, whatever ``count``.
    Integer tensors (BatchNorm's ``num_batches_tracked``) are taken from model 0.
    """
    result = {}
    for key in keys:
        first = read(0, key)
        if first.is_floating_point():
            del first  # read again by the merge: holding it would add a tensor to the peak
            result[key] = merge(key, LazyTensors(read, count, key))
        else:
            result[key] = first
    return result


# ------------------------------------------------------------------------------------ statistics from data
def fisher_diagonal(model: torch.nn.Module, batches: Iterable, num_examples: int) -> dict[str, torch.Tensor]:
    """The diagonal Fisher of every parameter (Matena & Raffel 2022, Eq. 2): the mean over the first
    ``num_examples`` inputs x of ``E_{y ~ p(y|x)} [(d log p(y|x) / d theta)^2]``, the expectation over y taken exactly
    (every class, weighted by the model's probability), from per-example gradients (``torch.func``)."""
    from torch.func import functional_call, grad, vmap

    was_training = model.training
    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def log_prob(p, x, c: int):
        logits = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return torch.log_softmax(logits, -1)[0, c]

    def per_example(c: int):
        return vmap(grad(lambda p, x: log_prob(p, x, c)), in_dims=(None, 0))
    fisher = {k: torch.zeros_like(v) for k, v in params.items()}
    seen = 0
    for x, _ in batches:
        x = x[: num_examples - seen]
        with torch.no_grad():
            probs = torch.softmax(model(x), -1)
        for c in range(probs.shape[1]):
            grads = per_example(c)(params, x)
            weight = probs[:, c]
            for k, g in grads.items():
                fisher[k] += torch.einsum("b,b...->...", weight, g.square())
        seen += len(x)
        if seen >= num_examples:
            break
    model.train(was_training)
    return {k: v / max(seen, 1) for k, v in fisher.items()}


def regmean_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The layers RegMean merges by their input Gram matrix: every ``nn.Linear`` and every ungrouped
    ``nn.Conv2d`` (a grouped convolution's input is not one shared design matrix); the rest is averaged."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) or (isinstance(m, torch.nn.Conv2d) and m.groups == 1)}


def input_grams(model: torch.nn.Module, batches: Iterable, num_examples: int) -> dict[str, torch.Tensor]:
    """``{"<layer>.weight": X^T X / rows}`` for every RegMean layer over the first ``num_examples`` inputs: X holds
    the layer's inputs (a convolution's unfolded patches, one row per output position), so that ``X W^T`` is the
    layer's output without bias. Normalised by the row count, as RegMean's reference code does, so models seen on
    different amounts of data weigh the same."""
    import torch.nn.functional as F

    layers = regmean_layers(model)
    grams: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def hook(name, module):
        def record(_, inputs, __):
            x = inputs[0].detach()
            if isinstance(module, torch.nn.Conv2d):
                x = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
                x = x.transpose(1, 2).reshape(-1, x.shape[1])
            else:
                x = x.reshape(-1, x.shape[-1])
            x = x.double()
            grams[name] = grams.get(name, 0) + x.T @ x
            rows[name] = rows.get(name, 0) + x.shape[0]
        return record

    handles = [m.register_forward_hook(hook(n, m)) for n, m in layers.items()]
    was_training = model.training
    model.eval()
    seen = 0
    try:
        with torch.no_grad():
            for x, _ in batches:
                x = x[: num_examples - seen]
                model(x)
                seen += len(x)
                if seen >= num_examples:
                    break
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {f"{name}.weight": g / rows[name] for name, g in grams.items()}


# ----------------------------------------------------------------------------------- methods by name, and selection
# Each method's hyperparameters, by the papers' names: the grid a config lists for each is searched on validation.
HYPERPARAMETERS = {
    "task_arithmetic": ("lam",),
    "ties": ("k", "lam"),
    "dare": ("p", "lam"),
    "model_stock": (),
    "slerp": ("t",),
    "fisher": (),
    "regmean": ("alpha",),
}
NEEDS_BASE = ("task_arithmetic", "ties", "dare", "model_stock")  # task vectors: theta_i - theta_0
NEEDS_DATA = {"fisher": "fisher", "regmean": "grams"}  # statistics each model computes on its training data


def key_merger(method: str, params: Mapping[str, float], *, base: Callable[[str], torch.Tensor] | None = None,
               stats: Sequence[Mapping[str, torch.Tensor]] | None = None, combine: str = "linear", seed: int = 0,
               floor: float = 1e-6) -> Callable[[str, Sequence[torch.Tensor]], torch.Tensor]:
    """``merge(key, tuned) -> tensor`` for :func:`merge_state`: method ``method`` with ``params``. ``base(key)``
    reads the pretrained tensor; ``stats[i]`` holds model i's Fisher or Gram per key (keys without statistics, such
    as BatchNorm buffers, or biases for RegMean, are averaged)."""
    if method in NEEDS_BASE and base is None:
        raise ValueError(f"{method} merges task vectors and needs the pretrained weights")

    def merge(key: str, tuned: Sequence[torch.Tensor]) -> torch.Tensor:
        if method == "task_arithmetic":
            return task_arithmetic(base(key), tuned, params["lam"])
        if method == "ties":
            return ties(base(key), tuned, params["k"], params["lam"])
        if method == "dare":
            return dare(base(key), tuned, params["p"], params["lam"], combine=combine, seed=seed, key=key)
        if method == "model_stock":
            return model_stock(base(key), tuned)
        if method == "slerp":
            if len(tuned) != 2:
                raise ValueError(f"SLERP interpolates two models, got {len(tuned)}")
            return slerp(tuned[0], tuned[1], params["t"])
        if stats is None or key not in stats[0]:
            return mean(tuned)
        if method == "fisher":
            return fisher_merge(tuned, [s[key] for s in stats], floor)
        if method == "regmean":
            return regmean(tuned, [s[key] for s in stats], params["alpha"])
        raise ValueError(f"unknown task-vector method {method!r}; one of {', '.join(HYPERPARAMETERS)}")

    return merge


def grid_points(method: str, settings: Mapping) -> list[dict[str, float]]:
    """The Cartesian product of the method's hyperparameter lists in ``settings`` (a scalar is a one-point list)."""
    import itertools

    names = HYPERPARAMETERS[method]
    values = []
    for name in names:
        given = settings[name]
        values.append([float(v) for v in given] if isinstance(given, Sequence) and not isinstance(given, str)
                      else [float(given)])
    return [dict(zip(names, combo)) for combo in itertools.product(*values)]


def select_merge(method: str, settings: Mapping, keys: Sequence[str], read: Callable[[int, str], torch.Tensor],
                 count: int, score: Callable[[dict], float], *, base: Callable[[str], torch.Tensor] | None = None,
                 stats: Sequence[Mapping[str, torch.Tensor]] | None = None
                 ) -> tuple[dict[str, float], dict[str, torch.Tensor], list[tuple[dict[str, float], float]]]:
    """Merge with every point of the method's grid (streaming each), score each merged state with ``score`` (the
    caller's validation score, higher is better) and keep the best; ties go to the earlier point.

    Returns ``(params, state, curve)`` with ``curve = [(params, score), ...]``.
    """
    best = None
    curve = []
    for params in grid_points(method, settings):
        merger = key_merger(method, params, base=base, stats=stats, combine=str(settings.get("combine", "linear")),
                            seed=int(settings.get("seed", 0)), floor=float(settings.get("floor", 1e-6)))
        state = merge_state(keys, read, count, merger)
        value = score(state)
        curve.append((params, value))
        if best is None or value > best[1]:
            best = (params, value, state)
    return best[0], best[2], curve
