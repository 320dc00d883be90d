"""BatchNorm statistics for evaluation: precise BN, statistics kept side by side, and the drift of the batch moments.

BatchNorm statistics never change the training trajectory: training mode normalizes every batch with its own moments,
and the running statistics are only read in eval mode. So one run can

- re-estimate the statistics with the current weights before an evaluation ("precise BN": an equal-weight average of
  the moments of N training batches, as fvcore's ``update_bn_stats`` and pycls' precise BN do; the computation is
  ``torch.optim.swa_utils.update_bn``), without disturbing the running statistics that training keeps;
- keep further sets of running statistics beside the model's own (:class:`ShadowStats`, e.g. PyTorch's EMA with
  momentum 0.1 beside the official zero-started EMA) and evaluate with each;
- record how fast each layer's batch moments move (:class:`MomentDrift`): the mechanism by which a slow EMA lags.

Each of these swaps buffers in and out of the model's BatchNorm layers inside a context manager that restores them.
"""
from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..models.factory import BN_MOMENTUM_DEFAULTS, BN_STATS

BUFFERS: tuple[str, ...] = ("running_mean", "running_var", "num_batches_tracked")
_SPEC = re.compile(r"^(torch|official)(?:@([0-9.eE+-]+))?$")


def bn_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """The BatchNorm layers of ``model`` that keep running statistics, with their qualified names."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, _BatchNorm) and m.track_running_stats]


def require_bn(model: nn.Module, what: str) -> list[tuple[str, _BatchNorm]]:
    """``bn_layers(model)``, or a ValueError saying that ``what`` needs BatchNorm."""
    layers = bn_layers(model)
    if not layers:
        raise ValueError(f"{what} needs a model with BatchNorm layers; {type(model).__name__} has none "
                         f"(norm 'spherenorm' or 'none'?)")
    return layers


@contextlib.contextmanager
def preserved_bn_state(model: nn.Module) -> Iterator[None]:
    """Restores every BatchNorm buffer (and momentum) of ``model`` on exit."""
    layers = bn_layers(model)
    saved = [({b: getattr(m, b).clone() for b in BUFFERS}, m.momentum) for _, m in layers]
    try:
        yield
    finally:
        for (_, m), (buffers, momentum) in zip(layers, saved):
            for b, value in buffers.items():
                getattr(m, b).copy_(value)
            m.momentum = momentum


def precise_bn(model: nn.Module, batches: Iterator[Tensor], *, device: torch.device | None = None) -> None:
    """Replaces the BatchNorm statistics of ``model`` by the equal-weight average of the batch moments of ``batches``.

    The moments are those the layer itself accumulates (unbiased variance for ``nn.BatchNorm2d``, biased for
    :class:`~torchsphere.nn.OfficialBatchNorm2d`); weights are not changed and no gradient is computed. This is
    ``torch.optim.swa_utils.update_bn`` (reset, ``momentum=None``, one forward per batch in training mode, momenta
    and mode restored).

    Raises:
        ValueError: the model has no BatchNorm layer, or ``batches`` is empty.
    """
    from torch.optim.swa_utils import update_bn

    require_bn(model, "precise BN")
    batches = list(batches) if not isinstance(batches, list) else batches
    if not batches:
        raise ValueError("precise BN needs at least one batch; got none")
    with torch.no_grad():
        update_bn(batches, model, device=device)


def precise_bn_batches(x: Tensor, num_batches: int, batch_size: int, seed: int) -> list[Tensor]:
    """``num_batches`` batches of ``x`` (without replacement while the data lasts), drawn by a generator of ``seed``.

    The caller's RNG is untouched, so re-estimating the statistics never changes the training trajectory.
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches <= 0:
        raise ValueError(f"precise_bn must be a positive number of batches; got {num_batches!r}")
    if x.shape[0] == 0:
        raise ValueError("precise BN needs training data; the training split is empty")
    generator = torch.Generator().manual_seed(seed)
    need = num_batches * batch_size
    order = torch.cat([torch.randperm(x.shape[0], generator=generator)
                       for _ in range(math.ceil(need / x.shape[0]))])[:need]
    return [x[order[i * batch_size:(i + 1) * batch_size]] for i in range(num_batches)]


def parse_stats_spec(spec: str) -> tuple[str, float]:
    """``"official"``, ``"torch"``, ``"torch@0.1"``, ``"official@0.001"`` -> (mode, momentum)."""
    match = _SPEC.match(spec) if isinstance(spec, str) else None
    if match is None:
        raise ValueError(f"bn statistics spec must be MODE or MODE@MOMENTUM with MODE in {list(BN_STATS)} "
                         f"(e.g. 'torch@0.1'); got {spec!r}")
    mode, momentum = match.group(1), match.group(2)
    value = BN_MOMENTUM_DEFAULTS[mode] if momentum is None else float(momentum)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"momentum of bn statistics spec {spec!r} must be in (0, 1]; got {value!r}")
    return mode, value


def spec_name(spec: str) -> str:
    """Column-safe name of a spec: ``"torch@0.1"`` -> ``"torch_0.1"``."""
    mode, momentum = parse_stats_spec(spec)
    return mode if "@" not in spec else f"{mode}_{momentum:g}"


class MomentHooks:
    """Forward pre-hooks on every BatchNorm layer of ``model`` that compute each training batch's per-channel mean and
    biased variance once and hand them to every consumer's ``update(index, mean, var, n)`` (training mode only, while
    not paused). Consumers: :class:`ShadowStats`, :class:`MomentDrift`.
    """

    def __init__(self, model: nn.Module, consumers: Sequence[Any]) -> None:
        self.layers = require_bn(model, "bn statistics hooks")
        modules = [m for _, m in self.layers]
        for consumer in consumers:
            if [m for _, m in consumer.layers] != modules:
                raise ValueError(f"{type(consumer).__name__} was built for another model's BatchNorm layers")
        self.consumers = list(consumers)
        self.enabled = True
        self._handles = [m.register_forward_pre_hook(self._hook(i)) for i, m in enumerate(modules)]

    def _hook(self, index: int):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if not (module.training and self.enabled):
                return
            x = args[0].detach()
            x = x.to(torch.promote_types(x.dtype, torch.float32))
            dims = [d for d in range(x.dim()) if d != 1]
            with torch.no_grad():
                var, mean = torch.var_mean(x, dim=dims, unbiased=False)
                n = x.numel() // x.shape[1]
                for consumer in self.consumers:
                    consumer.update(index, mean, var, n)
        return hook

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No updates inside (e.g. while precise BN runs forwards in training mode)."""
        enabled, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = enabled

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class ShadowStats:
    """Sets of running statistics kept beside the model's own, updated from the same training batches.

    Each set follows the semantics of its mode exactly as the layer would: ``"torch"`` starts at mean 0, var 1 and
    averages the unbiased batch variance; ``"official"`` starts both at 0 and averages the biased variance (TF 1.x
    ``ExponentialMovingAverage`` shadows). ``with shadow.applied(name):`` evaluates with a set. The sets are fed by
    :class:`MomentHooks` (``MomentHooks(model, [shadow])``).

    Args:
        model: the model whose BatchNorm layers are tracked.
        specs: ``"MODE"`` or ``"MODE@MOMENTUM"`` strings (:func:`parse_stats_spec`), distinct.
    """

    def __init__(self, model: nn.Module, specs: Sequence[str]) -> None:
        names = [spec_name(s) for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"bn statistics specs must be distinct; got {list(specs)!r}")
        self.layers = require_bn(model, "bn_shadow")
        self.specs = {name: parse_stats_spec(s) for name, s in zip(names, specs)}
        self.sets: dict[str, list[dict[str, Tensor]]] = {}
        for name, (mode, _) in self.specs.items():
            self.sets[name] = [dict(running_mean=torch.zeros_like(m.running_mean),
                                    running_var=(torch.zeros_like if mode == "official" else torch.ones_like)(
                                        m.running_var),
                                    num_batches_tracked=torch.zeros_like(m.num_batches_tracked))
                               for _, m in self.layers]

    def update(self, index: int, mean: Tensor, var: Tensor, n: int) -> None:
        for name, (mode, momentum) in self.specs.items():
            stats = self.sets[name][index]
            moment = var if mode == "official" else var * (n / max(n - 1, 1))
            stats["running_mean"].lerp_(mean.to(stats["running_mean"].dtype), momentum)
            stats["running_var"].lerp_(moment.to(stats["running_var"].dtype), momentum)
            stats["num_batches_tracked"].add_(1)

    @contextlib.contextmanager
    def applied(self, name: str) -> Iterator[None]:
        """The model's BatchNorm layers use set ``name`` inside; their own statistics are restored on exit."""
        if name not in self.sets:
            raise ValueError(f"unknown bn statistics set {name!r}; kept: {sorted(self.sets)}")
        with preserved_bn_state(nn.ModuleList([m for _, m in self.layers])):
            for (_, m), stats in zip(self.layers, self.sets[name]):
                for b in BUFFERS:
                    getattr(m, b).copy_(stats[b])
            yield

    def state_dict(self) -> dict[str, Any]:
        return {name: [{b: t.clone() for b, t in stats.items()} for stats in layer_sets]
                for name, layer_sets in self.sets.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if sorted(state) != sorted(self.sets):
            raise ValueError(f"bn shadow state holds sets {sorted(state)}; this run keeps {sorted(self.sets)}")
        for name, layer_sets in state.items():
            for stats, saved in zip(self.sets[name], layer_sets):
                for b in BUFFERS:
                    stats[b].copy_(saved[b])


class MomentDrift:
    """The drift of each BatchNorm layer's input moments between consecutive windows of training steps.

    Every training batch adds its per-channel mean and (biased) variance to the window's sums. :meth:`close_window`
    averages the window and returns, per layer, the relative change of the window-mean vector and of the
    window-variance vector from the previous window: ``|m_t - m_{t-1}| / |m_{t-1}|`` (Euclidean norms over channels),
    i.e. how far a layer's statistics move per window. The average of the window's variances is reported too.
    Fed by :class:`MomentHooks` (``MomentHooks(model, [drift])``).
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = require_bn(model, "bn_drift")
        self._sums = [None] * len(self.layers)
        self._count = 0
        self._previous: list[tuple[Tensor, Tensor]] | None = None

    def update(self, index: int, mean: Tensor, var: Tensor, n: int) -> None:
        mean, var = mean.double(), var.double()
        if self._sums[index] is None:
            self._sums[index] = [torch.zeros_like(mean), torch.zeros_like(var), 0]
        sums = self._sums[index]
        sums[0] += mean
        sums[1] += var
        sums[2] += 1

    def close_window(self, step: int) -> list[dict[str, Any]]:
        """One row per layer: ``step, layer, index, mean_rel_change, var_rel_change, var_mean`` (NaN changes for the
        first window); the window is reset."""
        if any(s is None or s[2] == 0 for s in self._sums):
            return []
        current = [(s[0] / s[2], s[1] / s[2]) for s in self._sums]
        rows = []
        for i, ((name, _), (mean, var)) in enumerate(zip(self.layers, current)):
            if self._previous is None:
                dm = dv = math.nan
            else:
                pm, pv = self._previous[i]
                dm = float((mean - pm).norm() / pm.norm().clamp_min(1e-12))
                dv = float((var - pv).norm() / pv.norm().clamp_min(1e-12))
            rows.append(dict(step=step, layer=name, index=i, mean_rel_change=dm, var_rel_change=dv,
                             var_mean=float(var.mean())))
        self._previous = current
        self._sums = [None] * len(self.layers)
        return rows

    def state_dict(self) -> dict[str, Any]:
        return dict(sums=[None if s is None else [s[0].clone(), s[1].clone(), int(s[2])] for s in self._sums],
                    previous=None if self._previous is None else [[m.clone(), v.clone()] for m, v in self._previous])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._sums = [None if s is None else [s[0].clone(), s[1].clone(), int(s[2])] for s in state["sums"]]
        self._previous = None if state["previous"] is None else [(m.clone(), v.clone()) for m, v in state["previous"]]
