"""Model averaging across sites: the weighted mean of parameters, BatchNorm statistics and optimizer state, and the
cyclical learning rate of one local phase.

Collaborative training (Xu, Mi, Feng et al., *Collaborative Deep Learning Across Multiple Data Centers*, arXiv
1810.06877, 2018; Sci. China Inf. Sci. 63(8):182102, 2020) trains one copy of the model per site and averages the
copies; its abstract names two strategies that make averaging work for deep non-convex nets: a cyclical learning rate
within each local phase and more local epochs between averagings. Only the abstract of the paper was available to
this project: the weighting, the BatchNorm treatment, the optimizer state and the cycle's shape and bounds below are
torchsphere's choices, stated as such.

Where the tensors live: a :class:`SiteReducer` sums one tensor per site over all sites — first over the sites this
process simulates (in site order), then over processes with ``torch.distributed.all_reduce`` (gloo on CPU, NCCL on
CUDA). The same functions therefore serve K sites simulated in one process and one process per site under
``torchrun``; for K = 2 both give the same bits (a + b is commutative).

PyTorch's own ``torch.distributed.algorithms.model_averaging.utils.average_parameters`` averages parameters only,
with equal weights, in the parameters' dtype, and rebinds ``p.data`` to views of one flat buffer. Here:

- :func:`average_tensors_` accumulates in float64 and copies back in place (``copy_``: storage, identity and optimizer
  references stay valid); site k has weight ``n_k / sum(n)``, its number of training examples (FedAvg, McMahan et al.,
  AISTATS 2017). Integer tensors (``num_batches_tracked``) take the largest value over the sites.
- :func:`average_models_` averages every parameter and every floating buffer (BatchNorm ``running_mean`` /
  ``running_var``: the ``average`` choice for BatchNorm statistics).
- :func:`recompute_bn_statistics_` is the ``recompute`` choice: after the parameters are averaged, every site forwards
  its own shard through the averaged model (train mode, no gradient) and the per-channel sums and sums of squares of
  every BatchNorm input are added over the sites: the running statistics become the exact mean and unbiased variance
  of the union of the sites' data (as features of the averaged model with batch statistics upstream, the recipe of
  ``torch.optim.swa_utils.update_bn``). Only these per-channel sums cross the sites.
- :func:`average_optimizers_` averages the floating optimizer state (Adam ``exp_avg`` / ``exp_avg_sq`` / ``step``,
  SGD ``momentum_buffer``) with the same weights.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .distributed import DistInfo

BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


class SiteReducer:
    """Sums (or maxes) one tensor per local site over every site of the job.

    Args:
        info: this process's place in the job; with ``info.enabled`` the local result is all-reduced over processes
            (the process group must be initialized).
    """

    def __init__(self, info: DistInfo | None = None) -> None:
        self.info = info or DistInfo()

    @property
    def distributed(self) -> bool:
        return self.info.enabled and dist.is_initialized()

    def sum(self, local: Sequence[Tensor]) -> Tensor:
        """Sum over all sites of ``local`` (this process's sites, in site order), on every process."""
        total = local[0].clone()
        for value in local[1:]:
            total += value
        if self.distributed:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    def max(self, local: Sequence[Tensor]) -> Tensor:
        total = local[0].clone()
        for value in local[1:]:
            total = torch.maximum(total, value)
        if self.distributed:
            dist.all_reduce(total, op=dist.ReduceOp.MAX)
        return total


def average_tensors_(groups: Sequence[Sequence[Tensor]], weights: Sequence[float], reducer: SiteReducer) -> None:
    """Replaces every site's tensors, in place, by their weighted mean over all sites.

    Args:
        groups: per local site, its tensors (same shapes and order on every site).
        weights: per local site, its weight (e.g. its number of examples); the mean is ``sum(w_k x_k) / sum(w_k)``,
            accumulated in float64. Integer tensors take the maximum over the sites instead.
        reducer: the :class:`SiteReducer` of the job.
    """
    if len(groups) != len(weights) or not groups:
        raise ValueError(f"need one weight per local site; got {len(groups)} tensor groups and {len(weights)} weights")
    shapes = [tuple(t.shape) for t in groups[0]]
    for site, group in enumerate(groups[1:], 1):
        if [tuple(t.shape) for t in group] != shapes:
            raise RuntimeError(f"site {site}'s tensors do not match site 0's: cannot average different models")
    floats = [i for i, t in enumerate(groups[0]) if t.is_floating_point()]
    ints = [i for i, t in enumerate(groups[0]) if not t.is_floating_point()]
    device = groups[0][0].device if groups[0] else torch.device("cpu")
    _check_same_size(sum(groups[0][i].numel() for i in floats), reducer, device)
    if floats:
        flats = [torch.cat([g[i].detach().reshape(-1).to(torch.float64) for i in floats]) * float(w)
                 for g, w in zip(groups, weights)]
        total_weight = float(reducer.sum([torch.tensor([float(w)], dtype=torch.float64, device=device)
                                          for w in weights]))
        if not total_weight > 0:
            raise ValueError(f"the site weights must sum to > 0; got {total_weight}")
        mean = reducer.sum(flats) / total_weight
        for group in groups:
            offset = 0
            for i in floats:
                n = group[i].numel()
                with torch.no_grad():
                    group[i].copy_(mean[offset:offset + n].view_as(group[i]))
                offset += n
    for i in ints:
        top = reducer.max([g[i].detach() for g in groups])
        for group in groups:
            group[i].copy_(top)


def model_tensors(model: nn.Module) -> list[Tensor]:
    """Every parameter and buffer of ``model`` (persistent or not), in module order."""
    return [p for p in model.parameters()] + [b for b in model.buffers()]


def average_models_(models: Sequence[nn.Module], weights: Sequence[float], reducer: SiteReducer) -> None:
    """Weighted mean of the parameters and floating buffers of the sites' models, in place on every local model."""
    average_tensors_([model_tensors(m) for m in models], weights, reducer)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The tensors of the optimizer's per-parameter state (parameter order, then key order)."""
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            out.extend(state[key] for key in sorted(state) if isinstance(state[key], Tensor))
    return out


def average_optimizers_(optimizers: Sequence[torch.optim.Optimizer], weights: Sequence[float],
                        reducer: SiteReducer) -> None:
    """Weighted mean of the sites' optimizer states (moments, momentum buffers, step counts), in place."""
    average_tensors_([optimizer_tensors(o) for o in optimizers], weights, reducer)


@torch.no_grad()
def recompute_bn_statistics_(models: Sequence[nn.Module], batches: Sequence[Iterable[Tensor]],
                             reducer: SiteReducer) -> int:
    """Sets the BatchNorm running statistics of every (identical, averaged) site model to those of the union of the
    sites' data: exact per-channel mean and unbiased variance of each BatchNorm input, summed over all sites.

    Args:
        models: the local sites' models (equal after averaging).
        batches: per local site, an iterable of its input batches (forwarded in train mode, as in training).
        reducer: the job's :class:`SiteReducer`.

    Returns:
        The number of BatchNorm layers updated.
    """
    per_site: list[list[Tensor]] = []
    for model, site_batches in zip(models, batches):
        layers = [m for m in model.modules() if isinstance(m, BN_TYPES) and m.track_running_stats]
        sums = [None] * len(layers)

        def hook(index: int):
            def record(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
                x = inputs[0].detach().to(torch.float64)
                dims = [d for d in range(x.ndim) if d != 1]  # every dimension but the channels
                count = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float64, device=x.device)
                value = torch.cat([x.sum(dim=dims), (x * x).sum(dim=dims), count])
                sums[index] = value if sums[index] is None else sums[index] + value
            return record

        handles = [layer.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
        was_training = model.training
        model.train()
        try:
            for x in site_batches:
                model(x)
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)
        if any(s is None for s in sums):
            raise ValueError("recompute needs at least one batch per site reaching every BatchNorm layer")
        per_site.append(sums)
    if not per_site or not per_site[0]:
        return 0
    flat = reducer.sum([torch.cat(s) for s in per_site])
    offset, updated = 0, 0
    for i, layer in enumerate(m for m in models[0].modules() if isinstance(m, BN_TYPES) and m.track_running_stats):
        c = layer.num_features
        total, squares, count = flat[offset:offset + c], flat[offset + c:offset + 2 * c], flat[offset + 2 * c]
        offset += 2 * c + 1
        mean = total / count
        var = (squares / count - mean * mean).clamp_min(0) * (count / max(float(count) - 1, 1.0))  # unbiased
        for model in models:
            target = [m for m in model.modules() if isinstance(m, BN_TYPES) and m.track_running_stats][i]
            target.running_mean.copy_(mean)
            target.running_var.copy_(var)
        updated += 1
    return updated


def cycle_factor(step: int, steps_per_round: int, shape: str, low: float) -> float:
    """The learning rate at ``step`` (0-based, within a round of ``steps_per_round`` steps) as a fraction of lr.

    One cycle per round (Smith, *Cyclical Learning Rates for Training Neural Networks*, WACV 2017, arXiv 1506.01186;
    a cosine restart as in SGDR, Loshchilov & Hutter, ICLR 2017, arXiv 1608.03983):

    - ``triangular``: ``low`` at the start, 1 at mid-round, back towards ``low`` at the end (the default: each round
      starts gently from the freshly averaged model, explores at the peak, and the sites are averaged at low-lr
      points, the argument of SWA, Izmailov et al., UAI 2018, arXiv 1803.05407);
    - ``cosine``: 1 at the start, cosine-annealed towards ``low`` at the end;
    - ``constant``: 1 throughout (no cycle).

    Args:
        step: the step within the round, ``0 <= step``; steps past the round repeat the cycle.
        steps_per_round: the length of the round, >= 1.
        shape: ``"triangular"``, ``"cosine"`` or ``"constant"``.
        low: lr_min / lr, in (0, 1].
    """
    if shape == "constant":
        return 1.0
    phase = (step % steps_per_round) / steps_per_round  # [0, 1)
    if shape == "triangular":
        return low + (1.0 - low) * (1.0 - abs(2.0 * phase - 1.0))
    if shape == "cosine":
        return low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * phase))
    raise ValueError(f"unknown lr_cycle {shape!r}; choose from ['constant', 'cosine', 'triangular']")


def _check_same_size(numel: int, reducer: SiteReducer, device: torch.device) -> None:
    """Every process must contribute tensors of one size, or the collective would fail or hang."""
    if not reducer.distributed:
        return
    sizes = torch.tensor([numel, -numel], dtype=torch.int64, device=device)
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX)
    if int(sizes[0]) != -int(sizes[1]):
        raise RuntimeError(f"the sites hold state of different sizes ({-int(sizes[1])} to {int(sizes[0])} numbers): "
                           f"cannot average different models or optimizers")
