"""Gradient flow through depth: per-layer activation, gradient and weight norms and the effective learning rate.

The deep-plain-net claim of Liu et al., *Deep Hyperspherical Learning* (NIPS 2017, arXiv 1711.03189, section on
deep plain networks) is that SphereConv keeps gradients from vanishing or exploding through depth, so deep plain
SphereNets are easier to optimize than CNNs of the same depth. This module measures what that claim is about, on any
model, without changing its training:

For every *tracked layer* (each ``nn.Conv1d/2d/3d``, ``nn.Linear`` and sphere layer -- SphereConv, SphereLinear,
SphereNorm, :class:`~torchsphere.nn.AngularHead` -- that owns a ``weight`` parameter), in the order in which the
forward pass first calls them (``index`` 0 = the layer nearest the input), and for a training step ``t`` (the
``t``-th optimizer step, 0-based; step 0 sees the initial weights ``w_0``):

- ``act_rms``: the root mean square of the layer's output *per example*, averaged over the batch,
  ``mean_n sqrt(mean_j y[n, j] ** 2)`` (``j`` runs over every non-batch element: channels x positions);
  :func:`activation_rms`.
- ``grad_norm``: the Frobenius norm ``||dL/dw_t||`` of the weight's gradient as the optimizer receives it (after
  ``backward``, before ``optimizer.step``; a GradScaler has already unscaled it).
- ``weight_norm``: ``||w_t||``, the Frobenius norm of the weight before the step.
- ``update_ratio``: the effective learning rate ``||w_{t+1} - w_t|| / ||w_t||`` of the step
  (:func:`relative_update`). For scale-invariant weights (a SphereConv filter: the output depends on ``w / ||w||``
  only; a plain convolution followed by BatchNorm) this, not the nominal lr, is the size of the step on the sphere.
  Adam's step is about ``lr`` per coordinate whatever ``||w||``, so as ``||w||`` grows (SphereConv filters get no
  weight decay in the official recipe) the effective step shrinks (van Laarhoven, arXiv 1706.05350; Hoffer et al.,
  NeurIPS 2018, arXiv 1803.01814).

Norms are computed in float64 from detached tensors under ``torch.no_grad()``; nothing the model, the optimizer or
the random number generators see is touched, so training with the diagnostic is bit-identical to training without it
(tests/test_gradient_flow.py checks the losses and the weights).

Usage (any model and optimizer; the rows are plain dicts, :func:`write_csv` writes them)::

    with GradientFlow(model, optimizer, every=10) as flow:
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(); loss.backward(); optimizer.step()  # steps 0, 10, 20, ... are recorded
    write_csv(flow.rows, "grad_flow.csv")

Without an optimizer (e.g. the gradient profile at initialization) call :meth:`GradientFlow.capture` after
``backward``; its rows have ``update_ratio`` NaN. The hooks are removed when the ``with`` block ends, also on an
exception. Attach the monitor to the plain module (not a ``torch.compile`` or DDP wrapper: hooks on the inner
modules still fire under DDP, not inside a compiled graph).
"""
from __future__ import annotations

import csv
import io
import math
import numbers
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ..nn.heads import AngularHead
from ..nn.sphere_conv import SPHERE_LAYERS

COLUMNS: tuple[str, ...] = ("step", "index", "name", "kind", "numel", "act_rms", "grad_norm", "weight_norm",
                            "update_ratio", "loss")
TRACKED_TYPES: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear, AngularHead, *SPHERE_LAYERS)


# ---------------------------------------------------------------------------------------------- functional core
def activation_rms(output: Tensor) -> float:
    """``mean_n sqrt(mean_j output[n, j] ** 2)``: the per-example RMS of a layer output (N, ...), batch-averaged.

    Args:
        output: a layer output whose first dimension is the batch; at least 1-D.

    Returns:
        A Python float computed in float64 (NaN for an empty batch).
    """
    if output.dim() == 0:
        raise ValueError("activation_rms needs a batched output (N, ...); got a 0-d tensor")
    flat = output.detach().reshape(output.shape[0], -1).to(torch.float64)
    if flat.shape[0] == 0 or flat.shape[1] == 0:
        return math.nan
    return float(flat.square().mean(dim=1).sqrt().mean())


def frobenius_norm(tensor: Tensor | None) -> float:
    """``||tensor||_F`` in float64 as a Python float; NaN for None (e.g. a weight that received no gradient)."""
    if tensor is None:
        return math.nan
    return float(tensor.detach().to(torch.float64).norm())


def relative_update(before: Tensor, after: Tensor) -> float:
    """The effective learning rate of one step: ``||after - before||_F / ||before||_F`` in float64.

    Raises:
        ValueError: if the shapes differ.
    """
    if before.shape != after.shape:
        raise ValueError(f"relative_update needs tensors of one shape; got {tuple(before.shape)} and "
                         f"{tuple(after.shape)}")
    b = before.detach().to(torch.float64)
    norm = float(b.norm())
    return float((after.detach().to(torch.float64) - b).norm()) / norm if norm > 0 else math.nan


def tracked_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every tracked layer of ``model`` (module order; forward order is found by
    :class:`GradientFlow` on the first recorded forward pass)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    return [(name or type(m).__name__, m) for name, m in model.named_modules()
            if isinstance(m, TRACKED_TYPES) and isinstance(getattr(m, "weight", None), nn.Parameter)]


# ---------------------------------------------------------------------------------------------- the monitor
class GradientFlow:
    """Hooks that record :data:`COLUMNS` for the tracked layers of ``model`` every ``every`` optimizer steps.

    Args:
        model: the plain module whose layers are measured.
        optimizer: the optimizer training ``model``; its step hooks mark the step boundaries and measure the
            gradient before and the update after each recorded step. None: call :meth:`capture` after each
            ``backward`` (no update ratio).
        every: record steps 0, every, 2 * every, ...

    Attributes:
        rows: one dict per (recorded step, layer), in step order, then forward order. The ``loss`` column is NaN
            unless the training loop reports the step's loss with :meth:`set_loss`.
        step: the index of the step in progress (the number of optimizer steps seen).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, every: int = 1) -> None:
        if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
            raise ValueError(f"every must be an integer >= 1; got {every!r}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None; got {type(optimizer).__name__}")
        self.layers = tracked_layers(model)
        if not self.layers:
            raise ValueError(f"{type(model).__name__} has no conv / linear / sphere layer with a weight to measure")
        self.model, self.optimizer, self.every = model, optimizer, int(every)
        self.rows: list[dict[str, Any]] = []
        self.step = 0
        self._order: dict[int, int] = {}  # id(module) -> forward index, fixed on the first recorded forward
        self._acts: dict[int, float] = {}
        self._grads: dict[int, tuple[float, float]] = {}
        self._before: dict[int, Tensor] = {}
        self._handles: list[Any] = []

    # -- lifecycle
    def __enter__(self) -> "GradientFlow":
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def attach(self) -> None:
        """Registers the forward hooks (and the optimizer's step hooks); idempotent."""
        if self._handles:
            return
        for _, module in self.layers:
            self._handles.append(module.register_forward_hook(self._forward_hook))
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_pre_hook(self._pre_step))
            self._handles.append(self.optimizer.register_step_post_hook(self._post_step))

    def remove(self) -> None:
        """Removes every hook this monitor registered (the model and optimizer are as before :meth:`attach`)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._before.clear()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @property
    def recording(self) -> bool:
        """True if the step in progress is recorded."""
        return self.step % self.every == 0

    # -- hooks
    def _forward_hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if not self.recording or not torch.is_grad_enabled() or id(module) in self._acts:
            return  # evaluation passes (no_grad) and repeated calls within a step are not training forwards
        if isinstance(output, (tuple, list)):
            output = output[0]
        if not isinstance(output, Tensor):
            return
        with torch.no_grad():
            self._acts[id(module)] = activation_rms(output)
        self._order.setdefault(id(module), len(self._order))

    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.recording:
            self._measure_gradients(keep_weights=True)

    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.recording:
            with torch.no_grad():
                updates = {key: relative_update(before, module.weight)
                           for key, before, module in ((id(m), self._before.get(id(m)), m) for _, m in self.layers)
                           if before is not None}
            self._commit(updates)
        self.step += 1

    # -- recording
    def _measure_gradients(self, keep_weights: bool) -> None:
        with torch.no_grad():
            for _, module in self.layers:
                weight = module.weight
                self._grads[id(module)] = (frobenius_norm(weight.grad), frobenius_norm(weight))
                if keep_weights:
                    self._before[id(module)] = weight.detach().clone()

    def capture(self) -> None:
        """Without an optimizer: records the step in progress now (call it after ``backward``) and advances
        :attr:`step`. The rows' ``update_ratio`` is NaN."""
        if self.optimizer is not None:
            raise RuntimeError("capture() is for a GradientFlow without an optimizer; with one, optimizer.step() "
                               "records the step")
        if self.recording:
            self._measure_gradients(keep_weights=False)
            self._commit({})
        self.step += 1

    def _commit(self, updates: dict[int, float]) -> None:
        def index(module: nn.Module) -> int:  # layers never called forward go last, in module order
            return self._order.get(id(module), len(self._order) + [m for _, m in self.layers].index(module))

        for name, module in sorted(self.layers, key=lambda nm: index(nm[1])):
            grad, weight = self._grads.get(id(module), (math.nan, math.nan))
            self.rows.append(dict(step=self.step, index=index(module), name=name, kind=type(module).__name__,
                                  numel=module.weight.numel(), act_rms=self._acts.get(id(module), math.nan),
                                  grad_norm=grad, weight_norm=weight,
                                  update_ratio=updates.get(id(module), math.nan), loss=math.nan))
        self._acts.clear()
        self._grads.clear()
        self._before.clear()

    def set_loss(self, step: int, loss: float) -> None:
        """Fills the ``loss`` column of the rows of ``step`` (a recorded step; other steps are ignored)."""
        for row in reversed(self.rows):
            if row["step"] == step:
                row["loss"] = float(loss)
            elif row["step"] < step:
                break


# ---------------------------------------------------------------------------------------------- files
def rows_to_csv(rows: Iterable[dict[str, Any]]) -> str:
    """The rows as CSV text with the header :data:`COLUMNS` (floats with 17 significant digits: exact)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (repr(float(v)) if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue()


def write_csv(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Writes :func:`rows_to_csv` to ``path`` atomically (a killed write leaves the previous file or none)."""
    from ..train.checkpoint import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, rows_to_csv(rows))
    return path


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """Reads a ``grad_flow.csv`` back: ints for step / index / numel, floats for the norms."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no gradient-flow file at {str(path)!r}")
    rows = []
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = set(COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{str(path)!r} is not a gradient-flow file: columns {sorted(missing)} missing")
        for raw in reader:
            rows.append({k: (int(raw[k]) if k in ("step", "index", "numel") else
                             raw[k] if k in ("name", "kind") else float(raw[k])) for k in COLUMNS})
    return rows
