"""Minimum hyperspherical energy (MHE): exact, half-space, angular, chunked and stochastic forms.

Liu et al., *Learning towards Minimum Hyperspherical Energy*, NeurIPS 2018 (arXiv 1805.09298); official code
wy1iu/MHE. A weight of shape (N, ...) is read as N neurons w_i of dimension d = prod(shape[1:]). As in the official
code the neurons are never rescaled explicitly; the cosine matrix uses eps-regularized norms,

    C_ij = <w_i, w_j> / (sqrt(||w_i||^2 + eps) * sqrt(||w_j||^2 + eps)),

so |C_ij| < 1 strictly and gradients flow through the norms. The energy is the mean over unordered pairs i < j of

    Euclidean, s = 0:  -log(2 - 2c)             (code form; = 2 * log(1 / ||w^_i - w^_j||), see below)
    Euclidean, s > 0:  (2 - 2c)^(-s/2)          (= ||w^_i - w^_j||^(-s))
    angular,   s = 0:  -log(theta/pi + 1e-4)    (A-MHE, theta = arccos c)
    angular,   s > 0:  (theta/pi + 1e-4)^(-s)

Factor 2 at s = 0: the paper's kernel is f_0(z) = log(1/z) of the distance z, while the official code takes the log
of the *squared* distance, i.e. exactly twice the paper's term. This module exposes the **code form** by default,
because the official coefficients (lambda_h, lambda_o) were tuned with it; ``paper_kernel=True`` halves the Euclidean
s = 0 term to give the paper's kernel. s in {0, 1, 2} are the official values; any real s > 0 is the natural extension.

Half-space MHE adds a virtual neuron -w_i for every w_i (2N neurons). It is computed exactly from the N x N matrix,
without concatenating [W; -W] (4x fewer FLOPs and 4x less memory), by

    E_half = [2 * sum_{i<j} (phi(c_ij) + phi(-c_ij)) + sum_i phi(-C_ii)] / (N (2N - 1)).

Numerical hazards, handled here: the diagonal is overwritten with a safe value *before* the kernel and its constant
contribution removed (no inf * 0, so no NaN gradient; the official code adds the identity to 2 - 2C for the same
reason); the squared distance is floored at ``DIST_SQ_FLOOR`` (1e-6, i.e. angles below ~1e-3 rad) and angles come
from ``safe_acos``, so two identical neurons give a finite value and a finite gradient (the official code relies on
eps alone, which fp32 rounding defeats for large-norm neurons); the row norms are overflow-safe
(:func:`torchsphere.functional.norms.safe_normalize`: ``w.square().sum()`` would overflow float32 for entries of
~1e19); everything runs in float32 at least, with autocast disabled (near-parallel neurons cancel catastrophically in
fp16/bf16).

Large N (e.g. 10,000 classes x 512): the pair sum runs over square blocks of at most ``chunk_size`` rows, only the
upper-triangular blocks are computed (half the matmul work), and each block is wrapped in activation checkpointing so
that neither the forward nor the backward pass ever holds more than one block of the N x N matrix.
``stochastic_energy`` estimates the mean energy from a subset of rows (the classes present in a batch, as the
SphereFace+ inter-class term, or a uniformly random subset), at O(m N d) cost for m rows.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..functional._checks import check_positive, check_tensor
from ..functional.norms import safe_normalize
from ..functional.operators import safe_acos

ANGLE_OFFSET = 1e-4  # official A-MHE offset added to theta / pi
DIST_SQ_FLOOR = 1e-6  # floor on the squared distance 2 - 2c: identical neurons give a finite value and gradient
DEFAULT_CHUNK = 2048  # rows per block; N <= DEFAULT_CHUNK is computed as one dense block
REDUCTIONS = ("mean", "sum")

Kernel = Callable[[Tensor], Tensor]


def check_s(s: object) -> float:
    """Returns the energy power ``s`` as a float if it is a finite real number >= 0, else raises."""
    if isinstance(s, bool) or not isinstance(s, numbers.Real):
        raise TypeError(f"s must be a real number >= 0; got {type(s).__name__} {s!r}")
    if not math.isfinite(float(s)) or float(s) < 0:
        raise ValueError(f"s must be a finite number >= 0; got {s!r}")
    return float(s)


def neurons(weight: object, name: str = "weight") -> Tensor:
    """Flattens a weight of shape (N, ...) to (N, d) in float32 at least, after checking it.

    Raises:
        TypeError: ``weight`` is not a floating-point tensor.
        ValueError: fewer than 2 dims, fewer than 2 neurons, or non-finite entries.
    """
    weight = check_tensor(name, weight)
    if not weight.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got dtype {weight.dtype}")
    if weight.dim() < 2:
        raise ValueError(f"{name} must have shape (N, ...) with at least 2 dims; got shape {tuple(weight.shape)}")
    if weight.shape[0] < 2:
        raise ValueError(f"{name} needs N >= 2 neurons (rows); got shape {tuple(weight.shape)}")
    if weight.numel() == 0:
        raise ValueError(f"{name} is empty; got shape {tuple(weight.shape)}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{name} has non-finite entries (NaN or inf)")
    return weight.reshape(weight.shape[0], -1).to(torch.promote_types(weight.dtype, torch.float32))


def normalize_rows(w: Tensor, eps: float) -> Tensor:
    """w_i / sqrt(||w_i||^2 + eps): the official eps-regularized normalization, rows of (N, d), overflow-safe."""
    return safe_normalize(w, 1, eps)


def pair_kernel(s: float, angular: bool = False, paper_kernel: bool = False) -> Kernel:
    """The per-pair energy term phi(c) as a function of the (eps-regularized) cosine c."""
    if angular:
        def phi(c: Tensor) -> Tensor:
            t = safe_acos(c) / math.pi + ANGLE_OFFSET
            return -torch.log(t) if s == 0 else t.pow(-s)
    else:
        log_scale = 0.5 if paper_kernel else 1.0

        def phi(c: Tensor) -> Tensor:
            d2 = torch.rsub(c, 2.0, alpha=2.0).clamp_min(DIST_SQ_FLOOR)  # squared chordal distance 2 - 2c
            return -log_scale * torch.log(d2) if s == 0 else d2.pow(-0.5 * s)
    return phi


def strict_upper(n: int, device: torch.device) -> Tensor:
    """Boolean (n, n) mask of the pairs i < j (by comparison: ``triu_`` on bool tensors is slow on CPU)."""
    r = torch.arange(n, device=device)
    return r[:, None] < r[None, :]


def _block_sum(a: Tensor, b: Tensor, phi: Kernel, half_space: bool, keep: Tensor | None) -> Tensor:
    """Sum of phi(c) (+ phi(-c) for half-space) over the entries of a @ b.T selected by ``keep`` (all if None)."""
    c = a @ b.t()  # (Ba, Bb)
    if keep is not None:
        c = c.masked_fill(~keep, 0.0)  # safe value before the kernel: no inf * 0 below
    t = phi(c) + phi(-c) if half_space else phi(c)
    if keep is not None:
        t = t.masked_fill(~keep, 0.0)
    return t.sum()


def _self_block_sum(a: Tensor, phi: Kernel, half_space: bool) -> Tensor:
    """Sum over the pairs i < j within ``a``: the symmetric matrix with its diagonal neutralized, halved.

    The diagonal is overwritten with 0 in place before the kernel (O(B), exactly zero gradient, no inf * 0), its
    constant contribution phi(0) is subtracted, and the two triangles are averaged: no (B, B) mask is built.
    """
    c = a @ a.t()  # (B, B); matmul saves a, not c, so the in-place write is safe for autograd
    c.diagonal().fill_(0.0)
    t = phi(c) + phi(-c) if half_space else phi(c)
    zero = phi(c.new_zeros(()))
    diag = (2.0 if half_space else 1.0) * a.shape[0] * zero
    return 0.5 * (t.sum() - diag)


def _run(fn: Callable[..., Tensor], ckpt: bool, *args) -> Tensor:
    if ckpt:  # recompute the block in backward instead of storing its (Ba, Bb) intermediates
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
    return fn(*args)


def check_chunk_size(chunk_size: object) -> int:
    if chunk_size is None:
        return DEFAULT_CHUNK
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1 or None; got {chunk_size!r}")
    return chunk_size


def _pair_sum(wn: Tensor, phi: Kernel, half_space: bool, chunk: int) -> Tensor:
    """Sum of the kernel over the unordered pairs of the N (or, half-space, 2N) normalized neurons."""
    n = wn.shape[0]
    ckpt = n > chunk and torch.is_grad_enabled() and wn.requires_grad
    total = wn.new_zeros(())
    for i0 in range(0, n, chunk):
        a = wn[i0:i0 + chunk]
        total = total + _run(_self_block_sum, ckpt, a, phi, half_space)
        for j0 in range(i0 + chunk, n, chunk):
            total = total + _run(_block_sum, ckpt, a, wn[j0:j0 + chunk], phi, half_space, None)
    if half_space:  # every pair (i, j) appears twice among 2N neurons, plus the N pairs (w_i, -w_i)
        total = 2.0 * total + phi(-wn.square().sum(1)).sum()
    return total


def _check_common(eps: object, reduction: object) -> float:
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose from {list(REDUCTIONS)}")
    return check_positive("eps", eps)


def hyperspherical_energy(weight: Tensor, s: float = 0.0, *, angular: bool = False, half_space: bool = False,
                          eps: float = 1e-4, reduction: str = "mean", paper_kernel: bool = False,
                          chunk_size: int | None = None) -> Tensor:
    """Hyperspherical energy of the neurons of one layer (MHE, Liu et al., NeurIPS 2018).

    Args:
        weight: (N, ...), N >= 2 neurons of dimension prod(shape[1:]) (a conv filter is flattened).
        s: power of the Riesz kernel, any real >= 0 (official: 0, 1, 2); 0 is the logarithmic kernel.
        angular: use the geodesic angle theta / pi + 1e-4 instead of the Euclidean distance (A-MHE).
        half_space: add the virtual neurons -w_i (half-space MHE, official for hidden layers).
        eps: added to every squared norm before the square root (official 1e-4).
        reduction: ``"mean"`` over unordered pairs (official; N(N-1)/2 pairs, or N(2N-1) half-space) or ``"sum"``.
        paper_kernel: use the paper's s = 0 kernel log(1/z), half the code's -log(z^2) (see the module docstring).
        chunk_size: rows per block. N <= chunk_size runs as one dense block; larger N runs in blocks with
            checkpointing, holding at most one chunk_size x chunk_size block. Default ``DEFAULT_CHUNK`` (2048).

    Returns:
        A 0-d tensor in float32 (float64 for float64 weights); lower means more evenly spread neurons.
    """
    w = neurons(weight)
    s = check_s(s)
    eps = _check_common(eps, reduction)
    chunk = check_chunk_size(chunk_size)
    n = w.shape[0]
    with torch.autocast(device_type=w.device.type, enabled=False):
        total = _pair_sum(normalize_rows(w, eps), pair_kernel(s, angular, paper_kernel), half_space, chunk)
    if reduction == "sum":
        return total
    return total / (n * (2 * n - 1) if half_space else n * (n - 1) / 2)


def stochastic_energy(weight: Tensor, s: float = 0.0, *, labels: Tensor | None = None, num_rows: int | None = None,
                      generator: torch.Generator | None = None, angular: bool = False, half_space: bool = False,
                      eps: float = 1e-4, paper_kernel: bool = False, chunk_size: int | None = None) -> Tensor:
    """Row-sampled estimate of the mean hyperspherical energy, at O(m N d) cost for m sampled rows.

    The rows R are the classes present in a batch (``labels``, SphereFace+ style: only pairs touching a batch class)
    or ``num_rows`` rows drawn uniformly without replacement. The estimate is the mean of the kernel over the ordered
    pairs (i, j), i in R, j != i (j over all N neurons; half-space: over the 2N - 1 partners of w_i). For uniformly
    drawn rows it is unbiased for :func:`hyperspherical_energy` with ``reduction="mean"``: every neuron is equally
    likely to be sampled and its row mean averages to the mean over all pairs. Rows from labels are unbiased when
    classes are sampled uniformly; class-imbalanced batches weight frequent classes more.

    Args:
        weight: (N, ...), N >= 2 neurons.
        s, angular, half_space, eps, paper_kernel, chunk_size: as :func:`hyperspherical_energy` (chunk_size bounds
            the number of columns per block).
        labels: integer class indices in [0, N) (any shape); duplicates are counted once.
        num_rows: number of rows to draw uniformly, 1 <= num_rows <= N.
        generator: the RNG for ``num_rows`` (on the weight's device).

    Returns:
        A 0-d tensor; its gradient reaches the sampled rows and, through the pairs, every neuron.
    """
    w = neurons(weight)
    s = check_s(s)
    eps = _check_common(eps, "mean")
    chunk = check_chunk_size(chunk_size)
    n = w.shape[0]
    if (labels is None) == (num_rows is None):
        raise ValueError(f"give exactly one of labels and num_rows; got labels={'None' if labels is None else '...'}, "
                         f"num_rows={num_rows!r}")
    if labels is not None:
        labels = check_tensor("labels", labels)
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dtype.is_complex:
            raise TypeError(f"labels must be an integer tensor; got dtype {labels.dtype}")
        if labels.numel() == 0:
            raise ValueError("labels is empty")
        rows = labels.reshape(-1).unique().to(w.device)
        if int(rows[0]) < 0 or int(rows[-1]) >= n:
            raise ValueError(f"labels must lie in [0, {n}); got min {int(rows[0])}, max {int(rows[-1])}")
    else:
        if isinstance(num_rows, bool) or not isinstance(num_rows, int) or not 1 <= num_rows <= n:
            raise ValueError(f"num_rows must be an int in [1, {n}]; got {num_rows!r}")
        rows = torch.randperm(n, generator=generator, device=w.device)[:num_rows]
    phi = pair_kernel(s, angular, paper_kernel)
    with torch.autocast(device_type=w.device.type, enabled=False):
        wn = normalize_rows(w, eps)
        a = wn[rows]  # (m, d)
        ckpt = n > chunk and torch.is_grad_enabled() and wn.requires_grad
        total = wn.new_zeros(())
        for j0 in range(0, n, chunk):
            cols = torch.arange(j0, min(j0 + chunk, n), device=w.device)
            keep = rows[:, None] != cols[None, :]  # (m, B): drop the pair of a neuron with itself
            total = total + _run(_block_sum, ckpt, a, wn[j0:j0 + chunk], phi, half_space, keep)
        if half_space:  # the partner -w_i of each sampled row
            total = total + phi(-a.square().sum(1)).sum()
    return total / (rows.numel() * (2 * n - 1 if half_space else n - 1))
