"""Hyperspherical uniformity regularizers: MHS, MGD, R-MHP, MHP and MHC.

Liu et al., *Learning with Hyperspherical Uniformity*, AISTATS 2021 (arXiv 2103.01649); official code
wy1iu/Sphere-Uniformity. A weight of shape (N, ...) is read as N neurons of dimension d, normalized with the
eps-regularized norms of :mod:`torchsphere.regularizers.energy` (C_ij = cosine with sqrt(||w||^2 + eps) norms).
Every function returns the term the **network minimizes** (the official sign), without the coefficient lambda:

    mhs    -(2 - 2 c_max): minus the smallest squared distance between two neurons (Tammes; ties are all summed)
    mgd    -logdet(K + jitter I), K_ij = exp(-(2 - 2 C_ij) / bandwidth)  (Gaussian-kernel Gram determinant)
    r_mhp  ||sum_i w_i||_2 on the raw weights (relaxed polarization; official), or on normalized ones
    mhp    -T, T = mean_i 1 / (2 - 2 cos(v, w_i)): polarization at a learned pole v (poles minimize T)
    mhc    T = -(1/gamma) log mean_i exp(-gamma (2 - 2 cos(v, w_i))): soft covering radius (poles maximize T)

Half-space (the virtual neurons -w_i, official for hidden layers of MHS, MGD, MHP, MHC) is computed exactly without
concatenation: MHS from the N x N matrix (pairs (i, j) and (i, -j) each occur twice, plus (i, -i)); MGD in block form,
logdet [[A, B], [B, A]] = logdet(A + B) + logdet(A - B) with A + B = 2 e^{-2/h} cosh(2C/h) + jitter I and
A - B = 2 e^{-2/h} sinh(2C/h) + jitter I, two N x N Choleskys instead of one 2N x 2N (4x cheaper).

MHP and MHC are min-max problems: the poles are separate parameters with their own optimizer. :func:`pole_step`
runs the inner pole steps (official: 10 momentum-SGD steps per network step, L2 5e-4 on the poles) on detached
weights; the poles are warm-started across network steps.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..functional._checks import check_positive, check_tensor
from ..functional.norms import safe_norm
from .energy import DIST_SQ_FLOOR, check_chunk_size, neurons, normalize_rows, strict_upper

POLE_STEPS = 10  # official inner pole steps per network step
POLE_WEIGHT_DECAY = 5e-4  # official L2 on the poles (TF l2_regularizer form: wd * ||v||^2 / 2)
MHC_GAMMA = 10.0  # official soft-min temperature of MHC
MGD_JITTER = 1e-6  # official diagonal jitter of the MGD kernel matrix


def _mhs_candidates(a: Tensor, b: Tensor, keep: Tensor | None, half_space: bool) -> list[tuple[Tensor, Tensor, int]]:
    """(squared distances, valid mask, multiplicity) of one block; half-space adds 2 + 2c (pairs (i, -j))."""
    c = a @ b.t()
    if keep is None:
        keep = torch.ones_like(c, dtype=torch.bool)
    dists = [2.0 - 2.0 * c, 2.0 + 2.0 * c] if half_space else [2.0 - 2.0 * c]
    mult = 2 if half_space else 1
    return [(d, keep & (d != 0), mult) for d in dists]  # exact zeros are skipped, as in the official code


def _min_of(cands: list[tuple[Tensor, Tensor, int]]) -> Tensor:
    return torch.stack([torch.where(v, d, math.inf).min() for d, v, _ in cands]).min()


def _sum_at(cands: list[tuple[Tensor, Tensor, int]], m: Tensor) -> Tensor:
    return sum(mult * torch.where(v & (d == m), d, 0.0).sum() for d, v, mult in cands)


def mhs(weight: Tensor, *, half_space: bool = False, eps: float = 1e-4, chunk_size: int | None = None) -> Tensor:
    """Maximum hyperspherical separation: minus the smallest squared distance 2 - 2c over neuron pairs.

    As the official code, all pairs at exactly the minimum are summed (ties are measure-zero in full space; in
    half-space the minimum occurs twice, so the term is -2 (2 - 2 max_{i<j} |c_ij|)) and the gradient reaches only
    the closest pair (a subgradient). Large N is processed in blocks: a gradient-free pass finds the minimum, then
    only the blocks attaining it are recomputed with gradient.

    Args:
        weight: (N, ...), N >= 2 neurons.
        half_space: include the virtual neurons -w_i.
        eps: added to every squared norm before the square root (official 1e-4).
        chunk_size: rows per block (default 2048).

    Returns:
        A 0-d tensor <= 0 (in [-4, 0] without ties); lower means better separated neurons.
    """
    w = neurons(weight)
    eps = check_positive("eps", eps)
    chunk = check_chunk_size(chunk_size)
    n = w.shape[0]
    with torch.autocast(device_type=w.device.type, enabled=False):
        wn = normalize_rows(w, eps)
        blocks = []  # (i0, j0, keep)
        for i0 in range(0, n, chunk):
            bi = min(chunk, n - i0)
            blocks.append((i0, i0, strict_upper(bi, w.device)))
            blocks += [(i0, j0, None) for j0 in range(i0 + chunk, n, chunk)]

        def cands(i0: int, j0: int, keep: Tensor | None) -> list:
            out = _mhs_candidates(wn[i0:i0 + chunk], wn[j0:j0 + chunk], keep, half_space)
            if half_space and i0 == j0 == 0:  # the pairs (w_i, -w_i): squared distance 2 + 2 C_ii, once each
                d = 2.0 + 2.0 * wn.square().sum(1)
                out.append((d, d != 0, 1))
            return out

        if len(blocks) == 1:
            cs = cands(*blocks[0])
            return -_sum_at(cs, _min_of(cs))
        with torch.no_grad():
            mins = torch.stack([_min_of(cands(*blk)) for blk in blocks])
        m = mins.min()
        total = wn.new_zeros(())
        for blk, bm in zip(blocks, mins):
            if bm == m:
                cs = cands(*blk)
                total = total + _sum_at(cs, _min_of(cs))
        return -total


def _logdet_pd(k: Tensor) -> Tensor:
    """log det of a symmetric positive-definite matrix by Cholesky; LU (slogdet) if Cholesky fails numerically."""
    chol, info = torch.linalg.cholesky_ex(k)
    if int(info) == 0:
        return 2.0 * chol.diagonal().log().sum()
    return torch.linalg.slogdet(k).logabsdet


def mgd(weight: Tensor, *, half_space: bool = False, eps: float = 1e-4, bandwidth: float = 1.0,
        jitter: float = MGD_JITTER) -> Tensor:
    """Maximum Gram determinant: -logdet(K + jitter I) with the Gaussian kernel K_ij = exp(-||w^_i - w^_j||^2 / h).

    Official: bandwidth 1, jitter 1e-6, no 1/N. Half-space uses the exact block form (module docstring).

    Args:
        weight: (N, ...), N >= 2 neurons.
        half_space: include the virtual neurons -w_i.
        eps: added to every squared norm before the square root (official 1e-4).
        bandwidth: the kernel bandwidth h > 0.
        jitter: added to the diagonal of K, > 0.

    Returns:
        A 0-d tensor; lower means a larger Gram volume (more evenly spread neurons).
    """
    w = neurons(weight)
    eps = check_positive("eps", eps)
    h = check_positive("bandwidth", bandwidth)
    jitter = check_positive("jitter", jitter)
    with torch.autocast(device_type=w.device.type, enabled=False):
        wn = normalize_rows(w, eps)
        c = wn @ wn.t()  # (N, N)
        eye = jitter * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
        if not half_space:
            return -_logdet_pd(torch.exp((2.0 * c - 2.0) / h) + eye)
        scale = 2.0 * math.exp(-2.0 / h)
        return -(_logdet_pd(scale * torch.cosh(2.0 * c / h) + eye) + _logdet_pd(scale * torch.sinh(2.0 * c / h) + eye))


def r_mhp(weight: Tensor, *, normalize: bool = False, eps: float = 1e-4) -> Tensor:
    """Relaxed maximum hyperspherical polarization: ||sum_i w_i||_2.

    max_{||v||=1} sum_i ||v - w^_i||^2 = 2N + 2 ||sum_i w^_i||, so min-max polarization relaxes to minimizing the norm
    of the sum. The official code applies it to the **raw** weights (``normalize=False``), which also shrinks the
    weight norms; ``normalize=True`` uses the eps-normalized neurons of the derivation. Not defined in half-space
    (the sum over [W; -W] is identically zero). O(N d).

    Args:
        weight: (N, ...), N >= 2 neurons.
        normalize: sum the eps-normalized neurons instead of the raw weights.
        eps: added to every squared norm before the square root (only with ``normalize=True``).

    Returns:
        A 0-d tensor >= 0 (a zero sum has gradient 0, not NaN).
    """
    w = neurons(weight)
    eps = check_positive("eps", eps)
    with torch.autocast(device_type=w.device.type, enabled=False):
        if normalize:
            w = normalize_rows(w, eps)
        return safe_norm(w.sum(0), 0)  # ||sum_i w_i||, no overflow of the squares


def _check_pole(pole: object, w: Tensor) -> Tensor:
    """Returns ``pole`` as (P, d) in the dtype of ``w`` after checking it."""
    pole = check_tensor("pole", pole)
    if not pole.is_floating_point():
        raise TypeError(f"pole must be a floating-point tensor; got dtype {pole.dtype}")
    if pole.dim() not in (1, 2) or pole.shape[-1] != w.shape[1] or pole.numel() == 0:
        raise ValueError(f"pole must have shape (d,) or (P, d) with d = {w.shape[1]} (the neuron dimension); "
                         f"got shape {tuple(pole.shape)}")
    if not bool(torch.isfinite(pole).all()):
        raise ValueError("pole has non-finite entries (NaN or inf)")
    return pole.reshape(-1, w.shape[1]).to(w.dtype)


def mhp(weight: Tensor, pole: Tensor, *, half_space: bool = False, eps: float = 1e-4) -> Tensor:
    """Maximum hyperspherical polarization: -T, T = mean_i 1 / (2 - 2 cos(v, w_i)) (official s = 2 potential).

    The network minimizes -T (raises the potential at the pole, the "hole" between neurons); the poles minimize T
    (they seek the hole), see :func:`pole_step`. With P poles the result is the mean over poles (official P = 1).
    The squared distance is floored at ``DIST_SQ_FLOOR``, so a pole on a neuron gives a finite value.

    Args:
        weight: (N, ...), N >= 2 neurons.
        pole: (d,) or (P, d) pole vectors (any norm; official init N(0, 1)).
        half_space: include the virtual neurons -w_i (mean over 2N).
        eps: added to every squared norm before the square root (official 1e-4).

    Returns:
        A 0-d tensor, < 0.
    """
    w = neurons(weight)
    v = _check_pole(pole, w)
    eps = check_positive("eps", eps)
    with torch.autocast(device_type=w.device.type, enabled=False):
        c = normalize_rows(v, eps) @ normalize_rows(w, eps).t()  # (P, N)
        t = (2.0 - 2.0 * c).clamp_min(DIST_SQ_FLOOR).reciprocal()  # (P, N)
        if half_space:
            t = torch.cat([t, (2.0 + 2.0 * c).clamp_min(DIST_SQ_FLOOR).reciprocal()], 1)
        return -t.mean()


def mhc(weight: Tensor, pole: Tensor, *, gamma: float = MHC_GAMMA, half_space: bool = False,
        eps: float = 1e-4) -> Tensor:
    """Minimum hyperspherical covering: T = -(1/gamma) log mean_i exp(-gamma (2 - 2 cos(v, w_i))).

    T is a soft minimum of the squared distances from the pole to the neurons. The network minimizes T (pulls the
    nearest neurons toward the pole); the poles maximize T (move to the largest hole), see :func:`pole_step`, so the
    min-max value approximates the squared covering radius. Mean over poles for P > 1 (official P = 1).

    Args:
        weight: (N, ...), N >= 2 neurons.
        pole: (d,) or (P, d) pole vectors.
        gamma: soft-min temperature > 0 (official 10).
        half_space: include the virtual neurons -w_i.
        eps: added to every squared norm before the square root (official 1e-4).

    Returns:
        A 0-d tensor.
    """
    w = neurons(weight)
    v = _check_pole(pole, w)
    eps = check_positive("eps", eps)
    gamma = check_positive("gamma", gamma)
    with torch.autocast(device_type=w.device.type, enabled=False):
        c = normalize_rows(v, eps) @ normalize_rows(w, eps).t()  # (P, N)
        d2 = 2.0 - 2.0 * c  # (P, N)
        if half_space:
            d2 = torch.cat([d2, 2.0 + 2.0 * c], 1)
        lse = torch.logsumexp(-gamma * d2, dim=1) - math.log(d2.shape[1])
        return (-lse / gamma).mean()


def init_pole(dim: int, num_poles: int = 1, *, device=None, generator: torch.Generator | None = None) -> Tensor:
    """A pole parameter of shape (num_poles, dim) drawn from N(0, 1) (official init), float32."""
    for name, v in (("dim", dim), ("num_poles", num_poles)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1; got {v!r}")
    return torch.nn.Parameter(torch.randn(num_poles, dim, device=device, generator=generator))


PoleFn = Callable[..., Tensor]


def pole_step(fn: PoleFn, weights: Sequence[Tensor], poles: Sequence[Tensor], optimizer: torch.optim.Optimizer, *,
              steps: int = POLE_STEPS, coefficients: float | Sequence[float] = 1.0,
              half_space: bool | Sequence[bool] = False, weight_decay: float = POLE_WEIGHT_DECAY,
              **kwargs) -> Tensor:
    """Runs the inner steps of the MHP / MHC min-max problem on the poles only.

    Minimizes, over the poles, sum_l coef_l * (-fn(w_l.detach(), v_l)) + weight_decay / 2 * sum_l ||v_l||^2: the
    network term of :func:`mhp` / :func:`mhc` with the sign flipped. The weights are detached, so no gradient
    reaches the network and no image forward pass is needed.

    Args:
        fn: :func:`mhp` or :func:`mhc`.
        weights: the layers' weights, one per pole.
        poles: the pole parameters (leaf tensors optimized by ``optimizer``).
        optimizer: the poles' own optimizer (official: momentum SGD 0.9 with the network's lr schedule).
        steps: inner steps (official 10).
        coefficients: lambda per layer (or one for all), as in the network term.
        half_space: per layer (or one for all).
        weight_decay: L2 coefficient on the poles (official 5e-4, TF form wd * ||v||^2 / 2).
        **kwargs: passed to ``fn`` (``eps``, ``gamma``).

    Returns:
        The pole objective after the last step's update was computed (detached, 0-d).
    """
    if fn not in (mhp, mhc):
        raise ValueError(f"fn must be torchsphere.regularizers.mhp or mhc; got {getattr(fn, '__name__', fn)!r}")
    if len(weights) != len(poles) or not poles:
        raise ValueError(f"need one pole per weight and at least one; got {len(weights)} weights, {len(poles)} poles")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1; got {steps!r}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0; got {weight_decay!r}")
    n = len(poles)
    coefs = [float(coefficients)] * n if isinstance(coefficients, (int, float)) else list(coefficients)
    halves = [bool(half_space)] * n if isinstance(half_space, bool) else list(half_space)
    if len(coefs) != n or len(halves) != n:
        raise ValueError(f"coefficients and half_space need one entry per pole ({n}); got {len(coefs)} and "
                         f"{len(halves)}")
    detached = [w.detach() for w in weights]
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = sum(-k * fn(w, v, half_space=h, **kwargs) for w, v, k, h in zip(detached, poles, coefs, halves))
            loss = loss + 0.5 * weight_decay * sum(v.square().sum() for v in poles)
            loss.backward()
            optimizer.step()
    return loss.detach()
