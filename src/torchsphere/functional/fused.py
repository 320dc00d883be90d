"""Fused SphereConv tail: g(theta) (+ bias) from a normalized convolution in one autograd node.

Liu et al., *Deep Hyperspherical Learning*, NIPS 2017 (arXiv 1711.03189). The eager composition of the SphereConv
tail (``conv.py``: divide by the filter norm, divide by the patch norm, clamp, acos, g) is a chain of separate
passes over the (N, C_out, *out) output, several of which autograd keeps for the backward pass. The fused path
(for SphereConv layers in float32/float64 without autocast, :mod:`torchsphere.functional.fused_conv` goes one step
further and makes the whole layer one node, with the kernels of this module):

1. Folds the filter norm into the weight before the convolution: conv(x, w / |w|) = conv(x, w) / |w|, so the
   division by |w| touches only the small weight (autograd differentiates through it).
2. Passes the patch norm as its reciprocal r = 1 / sqrt(|x_patch|^2 + eps), shape (N, G, *out) -- one value per
   output location and group, small next to (N, C_out, *out) -- computed by :func:`patch_rnorm` with a sum pool
   instead of the all-ones convolution where the padding allows it (cheaper, above all in the backward).
3. :class:`SphereTail` (a ``torch.autograd.Function``) takes the normalized convolution ``z`` and ``r`` and returns
   g(c) (+ bias) with c = z * r. It saves z, r and k only (not its output, so an in-place op after the layer stays
   legal) and recomputes c and the angle in the backward, whose derivative is analytic:

   - cosine: dg/dc = 1;
   - linear: dg/dc = (2/pi) / sqrt(1 - c^2) inside the acos clamp [-1 + ACOS_EPS, 1 - ACOS_EPS], 0 outside
     (the clamp semantics of ``safe_acos``: ``clamp`` passes the gradient on the closed interval);
   - sigmoid: with theta = acos(c), u = (pi/2 - theta) / (2k) = asin(c) / (2k), t = tanh(u), T = tanh(pi / (4k)),
     g = t / T (t computed as 1 - 2 / (exp(2u) + 1), one exp instead of the slower tanh):
     dg/dc = (1 - t^2) / (2 k T sqrt(1 - c^2)) (0 outside the clamp), and for a learned k
     dg/dk = g (1 - T^2) pi / (4 k^2 T) - (1 - t^2) u / (k T);

   then the chain rule: dL/dz = dL/dc * r, dL/dr = sum over the channels of dL/dc * z, dL/dk summed to k's shape;
   the patch norm's gradient reaches the input through autograd (the sum pool's or all-ones convolution's
   transpose, then :class:`ChannelSquareSum`'s one-pass backward), the filter norm's through the folded weight.
4. Runs the forward and the backward pointwise math as one kernel each. The backward's sum over the channels
   (dL/dr) runs in the same loop on the CPU training path of :class:`~.fused_conv.SphereConvFn` (measured, cosine,
   (128, 32, 28, 28), 1 thread, cold cache: 1.6 ms instead of 2.7 ms with the full-size terms stored and summed
   after), and from z the sum over k's dims (dL/dk) too; elsewhere the sums run after the kernel as ``aten``
   sums. Float32 tails evaluate
   arccos, arcsin, sin and cos as the polynomials of :mod:`torchsphere.functional.fast_math` (<= 5e-7 from float64;
   several times cheaper than the library functions), float64 tails the exact functions. On tensors of at least
   ``COMPILE_MIN_NUMEL`` elements the small functions below go through ``torch.compile(dynamic=True)``
   (Inductor emits one fused C++/OpenMP loop on CPU, one Triton kernel on CUDA; shape changes do not recompile,
   and each signature -- operator, dtype, convolution geometry -- compiles its own copy of the function, see
   :func:`compile_kernel`; the Python floats -- the module's constants, a fixed sigmoid k, a patch norm's eps --
   are compiled in as constants, one copy per value of the float arguments up to ``FLOAT_SPECIALIZATIONS``, see
   :func:`_call_compiled`; and the C++ compiler fuses each multiply-add into one instruction, see
   :data:`KERNEL_OPTIONS`).
   The first call in a process compiles (seconds; Inductor caches on disk), smaller tensors run the same functions
   eagerly, and when compilation is unavailable or fails the eager functions are used after one warning -- the
   compiler is never required for correctness. On CPU the backward of :class:`~.fused_conv.SphereConvFn` writes
   dL/dz into a buffer kept per thread for the last ``WORKSPACE_SHAPES`` shapes (:func:`clear_workspace` frees
   them): a fresh tensor of that size each step is page-faulted in again by glibc's malloc, which costs more than
   the loop that fills it. Inference does not pay
   the compile: when no input requires a gradient
   (``torch.no_grad()``, ``torch.inference_mode()``, a frozen model) a kernel that this process has not compiled yet
   runs eagerly (the same functions, equal up to float rounding), while the evaluations inside a training run reuse
   the kernels its steps compiled.
   Inside an outer ``torch.compile``/``torch.export`` trace the eager functions are traced (the outer compiler fuses
   them).

5. ``memory_efficient=True`` (``SphereTail.apply(..., save="output")``) saves the *output* instead of z: the
   backward inverts g to recover theta (cosine: c = g; linear: theta = (pi/2)(1 - g); sigmoid: t = g T,
   u = atanh(t), theta = pi/2 - 2ku) and uses dL/dr = sum(dL/dc * c) / r. When a BatchNorm (or any layer that
   saves its input) follows, it saves the same tensor, so the layer adds no full-size saved tensor over a plain
   convolution (the default mode keeps z, one extra (N, C_out, *out) tensor per layer). The price: an in-place op
   on the layer's output (e.g. ``ReLU(inplace=True)`` right after it) makes the backward raise autograd's
   "modified by an inplace operation" error. In float32 the recovered theta is less precise where g is flat in
   theta (near cos = +-1, and for the sigmoid operators with a small k where g saturates, where dg/dc -> 0 too).
   Measured on 400,001 float32 cosines in [-1, 1] (inside the clamp, the compiled kernels) against the float64
   gradient at the same cosines, the largest absolute error of dg/dc (save-output vs save-z) is: linear 1.8e-3 vs
   1.5e-3 (|dg/dc| up to 201), sigmoid k = 0.3 6.2e-3 vs 1.1e-4 (up to 11.3), k = 0.1 9.8e-4 vs 2.3e-4 (up to
   5.0), k = 0.05 2.1e-5 vs 2.1e-5 (up to 10.0) -- at most 5.5e-4 of the largest gradient; float64 agrees to
   1e-11. The models of :mod:`torchsphere.models` use this mode: they apply no in-place op to a convolution's
   output. In this mode the convolution output z is needed by nobody
   else, so the functional ops hand it over (``save="output-inplace"``) and the forward writes g into z's buffer
   instead of allocating a new full-size tensor (not for grouped convolutions, whose z is reshaped into a view).
   Inside a ``torch.compile``/``torch.export`` trace the layers save z whatever ``memory_efficient`` says
   (:func:`saves_output`): the compiler decides there what the backward keeps.

Double backward is not supported (the backward is ``once_differentiable``); the reference path
(``impl="reference"``) supports it. Under autocast the tail runs in float32 (an fp32 island) as the reference does;
float64 stays float64.
"""
from __future__ import annotations

import collections
import math
import threading
import types
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._checks import check_bool, check_choice, check_sigmoid_k
from .fast_math import asin_poly, cos_half_pi, sin_cos_half_pi, sin_half_pi
from .norms import channel_square_sum_safe
from .operators import ACOS_EPS, DEFAULT_SIGMOID_K

IMPLS: tuple[str, ...] = ("fused", "reference")
SAVES: tuple[str, ...] = ("z", "output", "output-inplace")  # what SphereTail keeps for its backward
_TWO_OVER_PI = 2.0 / math.pi
_HI = 1.0 - ACOS_EPS  # the acos clamp is [-_HI, _HI]
_THETA_LO = math.acos(_HI)  # theta of the clamped cosine lies in [_THETA_LO, pi - _THETA_LO]
_G_HI_LINEAR = 1.0 - _TWO_OVER_PI * _THETA_LO  # the linear operator's largest output
COMPILE_MIN_NUMEL = 1 << 18  # tails with at least this many elements use the compiled kernels


def check_impl(impl: object) -> str:
    """Returns ``impl`` if it names a SphereConv implementation (``"fused"`` or ``"reference"``), else raises."""
    return check_choice("impl", impl, IMPLS)


def tail_save(memory_efficient: bool, z: Tensor) -> str:
    """The ``save`` mode of :class:`SphereTail` for a fresh z: in place when saving the output and z is no view.

    Inside a ``torch.compile``/``torch.export`` trace always ``"z"`` (see :func:`saves_output`).
    """
    if not saves_output(memory_efficient):
        return "z"
    return "output" if z._base is not None else "output-inplace"


def saves_output(memory_efficient: bool) -> bool:
    """Whether a fused sphere layer saves its output (and inverts g in the backward) rather than z.

    ``memory_efficient`` outside a trace. Inside a ``torch.compile``/``torch.export`` trace never: there the
    compiler's partitioner chooses what to keep for the backward (it may recompute the output from z either way),
    so saving the output saves no memory, while inverting g costs arithmetic that saving z does not (measured on
    the linear SphereNet-9 step, compiled, 1 thread: 1.44x the compiled CNN with the inversion, 1.21x from z) and
    is less precise (item 5 of the module docstring).
    """
    return memory_efficient and not torch.compiler.is_compiling()


def check_memory_efficient(impl: object, memory_efficient: object) -> str:
    """Validates ``impl`` and ``memory_efficient`` together; returns ``impl``."""
    check_impl(impl)
    if check_bool("memory_efficient", memory_efficient) and impl != "fused":
        raise ValueError(f"memory_efficient=True needs impl='fused' (the reference composition keeps what autograd "
                         f"saves); got impl={impl!r}")
    return impl


def sigmoid_k_for(operator: str, sigmoid_k: float | Tensor | None) -> float | Tensor | None:
    """The k the operator uses: None for cosine/linear, 0.3 (official) for a missing sigmoid k; validated."""
    if operator in ("cosine", "linear"):
        return None
    if sigmoid_k is None:
        if operator == "learnable_sigmoid":
            raise ValueError("operator 'learnable_sigmoid' needs sigmoid_k (the learned, effective k); got None")
        return DEFAULT_SIGMOID_K
    return check_sigmoid_k(sigmoid_k)


def _box_padding(padding, kernel: tuple[int, ...], dilation) -> tuple[int, ...] | None:
    """Symmetric integer padding when a sum pool can replace the all-ones convolution, else None."""
    nd = len(kernel)
    dil = (dilation,) * nd if isinstance(dilation, int) else tuple(dilation)
    if any(d != 1 for d in dil):
        return None
    if padding == "valid":
        pad = (0,) * nd
    elif padding == "same":
        if any((k - 1) % 2 for k in kernel):
            return None  # asymmetric 'same' padding
        pad = tuple((k - 1) // 2 for k in kernel)
    else:
        pad = (padding,) * nd if isinstance(padding, int) else tuple(padding)
    return pad if all(2 * p <= k for p, k in zip(pad, kernel)) else None  # the pooling ops' limit


def patch_rnorm(input: Tensor, kernel: tuple[int, ...], stride, padding, dilation, groups: int,
                eps: float) -> Tensor:
    """1 / sqrt(|x_patch|^2 + eps) per group and output location, shape (N, G, *out).

    The squared input, summed over each group's channels (:class:`ChannelSquareSum`), is summed over every kernel
    window -- by a sum pool (``avg_pool`` with ``divisor_override=1``; zero padding counted, as the main
    convolution's) when the padding is symmetric and there is no dilation, else by an all-ones convolution -- as
    ``conv.patch_norm_sq`` computes it.
    """
    nd = len(kernel)
    if input.dtype == torch.float64:
        sq = ChannelSquareSum.apply(input, groups)  # (N, G, *spatial)
    else:  # scaled per location, summed in float64: no overflow (torchsphere.functional.norms)
        sq = channel_square_sum_safe(input, groups)
    pad = _box_padding(padding, kernel, dilation)
    if pad is None:
        ones = torch.ones((groups, 1, *kernel), dtype=sq.dtype, device=sq.device)
        total = (F.conv1d, F.conv2d, F.conv3d)[nd - 1](sq, ones, None, stride, padding, dilation, groups)
    elif nd == 1:
        total = F.avg_pool1d(sq, kernel, stride, pad, False, True) * kernel[0]
    else:
        total = (F.avg_pool2d, F.avg_pool3d)[nd - 2](sq, kernel, stride, pad, False, True, 1)
    return torch.rsqrt(total + eps).to(input.dtype)


def _tanh(x: float | Tensor) -> float | Tensor:
    return torch.tanh(x) if isinstance(x, Tensor) else math.tanh(x)


def _tanh_via_exp(u: Tensor) -> Tensor:
    """tanh(u) = 1 - 2 / (exp(2u) + 1): one exp, about twice as fast as tanh in the compiled CPU kernels (4.2M
    float32 elements, sigmoid forward: 8.3 ms instead of 15.5), absolute error ~1 ulp of 1 (the outputs lie in
    [-1, 1]); exp(2u) = inf gives exactly 1."""
    return 1.0 - 2.0 / (torch.exp(2.0 * u) + 1.0)


def _asin(c: Tensor) -> Tensor:
    """arcsin = pi/2 - arccos: exact for float64, the polynomial of :mod:`.fast_math` (error <= 5e-7) below."""
    return torch.asin(c) if c.dtype == torch.float64 else asin_poly(c)


def _atanh(t: Tensor) -> Tensor:
    """artanh: exact for float64; below, log((1 + t) / (1 - t)) / 2 (``atanh`` has no vectorized CPU kernel)."""
    return torch.atanh(t) if t.dtype == torch.float64 else 0.5 * torch.log((1.0 + t) / (1.0 - t))


def _sin_cos_half_pi(x: Tensor, cos_relative: bool) -> tuple[Tensor, Tensor]:
    """(sin(pi x / 2), cos(pi x / 2)) for x in [-1, 1]: exact for float64; below, the polynomials of
    :mod:`.fast_math`, with ``cos_relative`` the cosine accurate relative to its value where it vanishes
    (:func:`~.fast_math.cos_half_pi`, a second pair of polynomials), else both from one pair
    (:func:`~.fast_math.sin_cos_half_pi`, 2.4e-7 absolute).

    The backward from the output divides by this cosine (sin theta), which the acos clamp keeps at or above
    sin(theta_lo) = 1.4e-3, where one pair's error is 1.7e-4 relative, below the inversion's own error there (the
    module docstring, item 5: the save-output gradients of the sigmoid operators are as precise either way). The
    sigmoid operators use one pair (their backward from the output, ``bench_kernels``, (128, 32, 28, 28), 1 thread:
    7.5 ms instead of 11.9); linear keeps two, which is faster there (5.5 ms against 8.0: with one pair Inductor
    recomputes the inversion in the channel reduction instead of storing dL/dc * c).
    """
    if x.dtype == torch.float64:
        return torch.sin((math.pi / 2) * x), torch.cos((math.pi / 2) * x)
    return (sin_half_pi(x), cos_half_pi(x)) if cos_relative else sin_cos_half_pi(x)


def _sigmoid_parts(cc: Tensor, k: float | Tensor) -> tuple[Tensor, Tensor, float | Tensor]:
    """For a clamped cosine cc: u = (pi/2 - acos(cc)) / (2k) = asin(cc) / (2k), t = tanh(u), T = tanh(pi / (4k))."""
    u = _asin(cc) * (0.5 / k)
    return u, _tanh_via_exp(u), _tanh(math.pi / (4 * k))


def tail_forward(z: Tensor, r: Tensor, k: float | Tensor | None, bias: Tensor | None, operator: str) -> Tensor:
    """g(z * r) (+ bias): the pointwise forward of :class:`SphereTail`."""
    c = z * r
    if operator == "cosine":
        out = c
    elif operator == "linear":  # 1 - (2/pi) acos(c) = (2/pi) asin(c)
        out = _TWO_OVER_PI * _asin(c.clamp(-_HI, _HI))
    else:
        _, t, big_t = _sigmoid_parts(c.clamp(-_HI, _HI), k)
        out = t * (1.0 / big_t)
    return out if bias is None else out + bias


def tail_forward_inplace(z: Tensor, r: Tensor, k: float | Tensor | None, bias: Tensor | None,
                         operator: str) -> Tensor:
    """:func:`tail_forward` written into z's buffer (compiled, one loop without a new full-size allocation)."""
    return z.copy_(tail_forward(z, r, k, bias, operator))


def _grad_k_terms(grad: Tensor, t: Tensor, sech2: Tensor, u: Tensor, k: Tensor, big_t: Tensor) -> Tensor:
    """dL/dout * dg/dk, to be summed to k's shape: dg/dk = g (1 - T^2) pi / (4 k^2 T) - (1 - t^2) u / (k T), g = t / T."""
    return grad * (t * ((1.0 - big_t * big_t) * math.pi / (4 * k * k * big_t * big_t))
                   - sech2 * u * (1.0 / (k * big_t)))


def tail_backward_terms(grad: Tensor, z: Tensor, r: Tensor, k: float | Tensor | None, operator: str,
                        need_k: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """The pointwise part of :func:`tail_backward`: (dL/dz, dL/dc * z, dL/dout * dg/dk), all of z's shape.

    The reductions to r's and k's shapes run outside (:func:`reduce_tail_terms`); :func:`tail_backward_terms_into`
    sums dL/dr's terms inside its loop.
    """
    c = z * r
    grad_k = None
    if operator == "cosine":
        gc = grad
    else:
        outside = c.abs() > _HI  # zero gradient outside the acos clamp, as safe_acos
        cc = c.clamp(-_HI, _HI)
        if operator == "linear":
            gc = torch.where(outside, 0.0, grad * (_TWO_OVER_PI * torch.rsqrt(1.0 - cc * cc)))
        else:
            u, t, big_t = _sigmoid_parts(cc, k)
            sech2 = 1.0 - t * t
            gc = torch.where(outside, 0.0, grad * sech2 * torch.rsqrt(1.0 - cc * cc) * (0.5 / (k * big_t)))
            if need_k:
                grad_k = _grad_k_terms(grad, t, sech2, u, k, big_t)
    return gc * r, gc * z, grad_k


def tail_backward(grad: Tensor, z: Tensor, r: Tensor, k: float | Tensor | None, operator: str,
                  need_k: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """(dL/dz, dL/dr, dL/dk) of :func:`tail_forward` given dL/dout; dL/dr and dL/dk summed to r's and k's shapes."""
    return reduce_tail_terms(tail_backward_terms(grad, z, r, k, operator, need_k), r, k, False)


def reduce_tail_terms(terms: tuple[Tensor, Tensor, Tensor | None], r: Tensor, k: float | Tensor | None,
                      from_output: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """(dL/dz, dL/dr, dL/dk) from the pointwise terms: dL/dr = sum(dL/dc * z), or sum(dL/dc * c) / r from the
    output (z = c / r with r constant over the summed dims); dL/dk = sum(dL/dout * dg/dk)."""
    grad_z, p, dk = terms
    grad_r = p.sum_to_size(r.shape)
    return grad_z, grad_r / r if from_output else grad_r, None if dk is None else dk.sum_to_size(k.shape)


def tail_backward_from_output(grad: Tensor, out: Tensor, r: Tensor, k: float | Tensor | None, bias: Tensor | None,
                              operator: str, need_k: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`tail_backward` from the saved output g (+ bias) instead of z: theta is recovered by inverting g."""
    return reduce_tail_terms(tail_backward_from_output_terms(grad, out, r, k, bias, operator, need_k), r, k, True)


def tail_backward_from_output_terms(grad: Tensor, out: Tensor, r: Tensor, k: float | Tensor | None,
                                    bias: Tensor | None, operator: str,
                                    need_k: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """The pointwise part of :func:`tail_backward_from_output`: (dL/dz, dL/dc * c, dL/dout * dg/dk).

    Entries at the acos clamp (|g| within 4 ulp of the largest output) count as outside it (zero gradient); the
    reference passes the gradient on the closed interval, so the two differ only for cosines within float rounding
    of +-(1 - ACOS_EPS).
    """
    g = out if bias is None else out - bias
    grad_k = None
    if operator == "cosine":
        gc, c = grad, g
    else:
        tol = 4 * torch.finfo(g.dtype).eps
        if operator == "linear":
            outside = g.abs() >= _G_HI_LINEAR - tol
            # theta = (pi/2)(1 - g): cos theta = sin(pi g / 2), sin theta = cos(pi g / 2)
            c, sin_theta = _sin_cos_half_pi(g.clamp(-_G_HI_LINEAR, _G_HI_LINEAR), True)
            gc = torch.where(outside, 0.0, grad * (_TWO_OVER_PI / sin_theta))
        else:
            big_t = _tanh(math.pi / (4 * k))
            outside = g.abs() >= _tanh((math.pi / 2 - _THETA_LO) / (2 * k)) / big_t - tol
            t = (g * big_t).clamp(tol / 4 - 1.0, 1.0 - tol / 4)  # atanh stays finite where g saturates
            u = _atanh(t)
            # 2ku = asin(c) = pi/2 - theta: cos theta = sin(2ku), sin theta = cos(2ku)
            y = (u * (4 * k / math.pi)).clamp(_THETA_LO * _TWO_OVER_PI - 1.0, 1.0 - _THETA_LO * _TWO_OVER_PI)
            c, sin_theta = _sin_cos_half_pi(y, False)
            sech2 = 1.0 - t * t
            gc = torch.where(outside, 0.0, grad * sech2 / sin_theta * (0.5 / (k * big_t)))
            if need_k:
                grad_k = _grad_k_terms(grad, t, sech2, u, k, big_t)
    return gc * r, gc * c, grad_k


# (name, signature without float values) -> {float values -> compiled kernel, None -> the copy taking them as
# inputs}; "failed" -> True after a compiler failure
_COMPILED: dict = {}
_WARM: set[str] = set()  # kernels that have compiled and run in this process


# Inductor options of every kernel (a kernel's own options are added, and win). Floating-point contraction: the C++
# compiler fuses each a * b + c of the generated loop into one fused multiply-add, rounded once (PyTorch's default,
# "off", keeps a multiplication and an addition, rounded twice; the polynomials of fast_math are chains of
# multiply-adds whose latency then bounds the loop). Measured at (128, 32, 28, 28), float32, 1 thread, warm cache: the
# sigmoid forward 4.1-4.4 ms instead of 6.8-7.9, linear's 1.6-1.7 instead of 2.1 (benchmarks/bench_kernels.py
# measures every kernel both ways). The bounds of fast_math hold in the contracted kernels (tests/test_fast_math.py).
KERNEL_OPTIONS = {"cpp.enable_floating_point_contract_flag": "fast"}


def compile_kernel(fn: Callable, backend: str = "inductor", options: dict | None = None) -> Callable:
    """``torch.compile(dynamic=True, fullgraph=True)`` of a fresh copy of ``fn`` (a new code object).

    Dynamo keeps its compiled graphs, and counts recompilations against ``recompile_limit``, per code object; every
    kernel signature gets its own copy, so the operators, dtypes and convolution geometries of a long-lived process
    never add up to that limit (which would make the kernels fall back to eager for good). ``options``: Inductor
    options (``torch.compile(options=...)``) added to :data:`KERNEL_OPTIONS`, for the inductor backend only.
    """
    fresh = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    if backend == "inductor":
        options = {**KERNEL_OPTIONS, **(options or {})}
        import torch._inductor.config as inductor_config  # options this PyTorch does not know are left out
        options = {key: value for key, value in options.items() if hasattr(inductor_config, key)}
    return torch.compile(fresh, dynamic=True, fullgraph=True, backend=backend,
                         options=options if options and backend == "inductor" else None)


FLOAT_SPECIALIZATIONS = 8  # float-argument values compiled as constants per kernel; further values stay inputs
_DYNAMO_CONFIG = getattr(getattr(torch, "_dynamo", None), "config", None)
_CAN_SPECIALIZE_FLOATS = hasattr(_DYNAMO_CONFIG, "specialize_float")


def _signature(args: tuple) -> tuple:
    """What makes Dynamo specialize a kernel call, float values aside (see :func:`_compiled_for`): the other
    non-tensor arguments and each tensor's dtype, device and rank (sizes are dynamic)."""
    return tuple((a.dtype, a.device.type, a.dim()) if isinstance(a, Tensor) else
                 ("float",) if isinstance(a, float) else a for a in args)


def _call_compiled(compiled: Callable, args: tuple, specialize_floats: bool):
    """``compiled(*args)``; with ``specialize_floats``, Dynamo traces the Python floats it meets -- the float
    arguments and the module constants (pi, the polynomial coefficients of :mod:`.fast_math`, the clamp bounds)
    -- as constants of the generated code rather than as run-time inputs (``torch._dynamo.config
    .specialize_float``; PyTorch's default as of torch 2.13 keeps them inputs, which the generated C++ loop loads
    and converts in every iteration: ``benchmarks/bench_kernels.py`` at (128, 32, 28, 28), float32, measures the
    linear operator's backward from the output at 5.8 ms instead of 13.0 (1 thread) and 3.3 instead of 7.6 (2
    threads), the sigmoid forward at 6.2 instead of 9.8). The setting matters only while Dynamo traces;
    it is restored after the call (recent PyTorch keeps it per thread, in a context variable)."""
    if not (specialize_floats and _CAN_SPECIALIZE_FLOATS):
        return compiled(*args)
    before = _DYNAMO_CONFIG.specialize_float
    _DYNAMO_CONFIG.specialize_float = True
    try:
        return compiled(*args)
    finally:
        _DYNAMO_CONFIG.specialize_float = before


def _compiled_for(name: str, fn: Callable, args: tuple, options: dict | None,
                  specialize_floats: bool = True) -> tuple[Callable, bool]:
    """The compiled copy of ``fn`` for this call's signature, and whether it specializes its floats.

    Each float-argument value (a sigmoid operator's k, a patch norm's eps) gets a copy of its own, up to
    ``FLOAT_SPECIALIZATIONS`` values per kernel and signature; beyond that (or without ``specialize_floats``) one
    shared copy takes the floats as run-time inputs, so a process that sweeps many values (a k search) never
    compiles without end."""
    copies = _COMPILED.setdefault((name, _signature(args)), {})
    values = tuple(a for a in args if isinstance(a, float))
    if specialize_floats and values in copies:
        return copies[values], True
    if specialize_floats and len(copies) < FLOAT_SPECIALIZATIONS:
        copies[values] = _compile(fn, options)
        return copies[values], True
    if None not in copies:
        copies[None] = _compile(fn, options)
    return copies[None], False


def _compile(fn: Callable, options: dict | None) -> Callable:
    # compile_kernel looked up at call time (tests swap it for another backend) and given options only when set
    return compile_kernel(fn) if options is None else compile_kernel(fn, options=options)


def _kernel(name: str, fn: Callable, numel: int, inference: bool = False, options: dict | None = None,
            specialize_floats: bool = True) -> Callable:
    """The compiled ``fn`` for large tensors outside a trace, else ``fn`` itself (see the module docstring).

    ``options``: Inductor options of this kernel; ``specialize_floats``: compile the Python floats as constants
    (:func:`_call_compiled`).

    ``inference``: no input requires a gradient (``torch.no_grad()``, a frozen model); then a kernel that has not
    been compiled in this process runs eagerly instead of waiting for its compilation. (Grad mode itself cannot
    tell: it is always off inside an ``autograd.Function``'s forward and backward.)
    """
    if numel < COMPILE_MIN_NUMEL or torch.compiler.is_compiling() or _COMPILED.get("failed"):
        return fn
    if inference and name not in _WARM:  # inference: never wait for a first compilation
        return fn

    def run(*args):
        try:
            compiled, specialized = _compiled_for(name, fn, args, options, specialize_floats)
            out = _call_compiled(compiled, args, specialized)
            _WARM.add(name)
            return out
        except Exception as err:  # noqa: BLE001 -- any compiler failure: fall back to the eager kernel for good
            _COMPILED["failed"] = True
            warnings.warn(f"torchsphere: compiling the fused SphereConv tail failed ({type(err).__name__}: {err}); "
                          "using the eager kernels", RuntimeWarning, stacklevel=3)
            return fn(*args)

    return run


def saved_or_explain(ctx) -> tuple[Tensor, ...]:
    """``ctx.saved_tensors``, or autograd's in-place error with what it means for a layer that saves its output."""
    try:
        return ctx.saved_tensors
    except RuntimeError as err:
        if ctx.save_output and "inplace operation" in str(err):
            raise RuntimeError(f"{err}\n\ntorchsphere: this sphere layer runs with memory_efficient=True, so it "
                               "saves its output for the backward, and an in-place op after the layer (e.g. "
                               "ReLU(inplace=True) or x += ...) modified that output. Build the layer (or "
                               "convert_to_sphere) with memory_efficient=False, or make the next op "
                               "out-of-place.") from None
        raise


def tail_backward_terms_into(grad_z: Tensor, grad: Tensor, z: Tensor, r: Tensor, k: float | Tensor | None,
                             operator: str, need_k: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`tail_backward_terms` with dL/dz written into the buffer ``grad_z`` and dL/dr's and dL/dk's terms
    summed to r's and k's shapes in the same compiled kernel (the full-size terms are never stored; for
    ``learnable_sigmoid`` at (128, 32, 28, 28), 1 thread: 10.3 ms instead of 14.5 ms with dL/dk summed after)."""
    a, b, grad_k = tail_backward_terms(grad, z, r, k, operator, need_k)
    return grad_z.copy_(a), b.sum_to_size(r.shape), None if grad_k is None else grad_k.sum_to_size(k.shape)


def tail_backward_from_output_terms_into(grad_z: Tensor, grad: Tensor, out: Tensor, r: Tensor,
                                         k: float | Tensor | None, bias: Tensor | None, operator: str,
                                         need_k: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`tail_backward_from_output_terms` with dL/dz written into ``grad_z`` and dL/dr = sum(dL/dc * c) / r
    computed in the same compiled loop."""
    a, b, grad_k = tail_backward_from_output_terms(grad, out, r, k, bias, operator, need_k)
    return grad_z.copy_(a), b.sum_to_size(r.shape) / r, grad_k


def tail_backward_pointwise_into(grad_z: Tensor, grad: Tensor, z: Tensor, r: Tensor, k: float | None,
                                 operator: str) -> Tensor:
    """dL/dz of :func:`tail_backward_terms` written into the buffer ``grad_z`` (a pointwise kernel only; dL/dr
    follows from it, :func:`grad_r_from_grad_z`)."""
    return grad_z.copy_(tail_backward_terms(grad, z, r, k, operator, False)[0])


def grad_r_from_grad_z(grad_z: Tensor, z: Tensor, r: Tensor) -> Tensor:
    """dL/dr = sum(dL/dc * z) over the channels, from dL/dz = dL/dc * r: sum(dL/dz * z) / r; 0 where r = 0 (a patch
    norm beyond float range, where r's own gradient path multiplies by r^3 = 0)."""
    return torch.where(r > 0, (grad_z * z).sum_to_size(r.shape) / r, 0.0)


# Operators whose CPU backward from z runs as two kernels: dL/dz written by a pointwise kernel, then dL/dr reduced
# from dL/dz and z. In one kernel Inductor emits the channel reduction and the pointwise store as two loop nests
# in different orders, each reading dL/dout and z and computing dL/dc (twice, for linear: the reciprocal square
# root). Split, the arithmetic runs once over the same memory traffic. Measured (bench_kernels, (128, 32, 28, 28),
# float32, caches evicted): linear 4.3 ms instead of 6.2 (1 thread), 2.3 instead of 3.3 (2 threads). The sigmoid
# operators are faster in one kernel with _INLINE_ALL (7.1 ms against 8.8 split), where Inductor stores dL/dc once;
# cosine has no arithmetic to save.
_SPLIT_BACKWARD = ("linear",)

# Inductor options of the sigmoid operators' backward from z: recompute every pointwise intermediate inside the
# channel reduction instead of storing the heavy ones (Inductor's CPU default stores an intermediate of more than 50
# ops or 12 reads) and reading them back. Measured at (128, 32, 28, 28), float32, 1 thread: 7.9 ms instead of
# 14.9. Cosine gains nothing, and linear and every backward from the output are as fast or faster with the default
# (linear from the output: 3.4 ms against 5.8 ms inlined).
_INLINE_ALL = {"realize_opcount_threshold": 1 << 20, "realize_acc_reads_threshold": 1 << 20}

_WORKSPACE = threading.local()  # per thread: (shape, dtype, device) -> the dL/dz buffer of the backward
WORKSPACE_SHAPES = 8  # buffers are kept for this many shapes per thread (least recently used dropped first)


def _workspace(like: Tensor) -> Tensor:
    """A buffer shaped like ``like``, kept per thread for the last ``WORKSPACE_SHAPES`` shapes and reused by
    every backward of that shape. On CPU, glibc's malloc hands large freed blocks back to the kernel and
    page-faults them in again at the next allocation, so a fresh full-size tensor per layer and step costs more
    than the loop that fills it (docs/benchmarks.md)."""
    cache = getattr(_WORKSPACE, "buffers", None)
    if cache is None:
        cache = _WORKSPACE.buffers = collections.OrderedDict()
    key = (tuple(like.shape), like.dtype, like.device)
    if key in cache:
        cache.move_to_end(key)
    else:
        cache[key] = torch.empty(like.shape, dtype=like.dtype, device=like.device)
        while len(cache) > WORKSPACE_SHAPES:
            cache.popitem(last=False)
    return cache[key]


def clear_workspace() -> None:
    """Frees this thread's backward buffers (they are allocated again at the next CPU training step)."""
    _WORKSPACE.buffers = collections.OrderedDict()


def tail_grads(grad: Tensor, saved: Tensor, r: Tensor, k: float | Tensor | None, bias: Tensor | None,
               operator: str, from_output: bool, need_k: bool,
               workspace: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """(dL/dz, dL/dr, dL/dk) of the tail from the saved z (or output, with its bias): the pointwise terms in one
    kernel, then the reductions.

    ``workspace``: the caller consumes dL/dz before the next backward of this thread (as :class:`SphereConvFn`
    does, in its convolution's backward); then, for CPU tensors on the compiled path, dL/dz is written into a
    reused buffer (:func:`_workspace`; CUDA's caching allocator needs none) and dL/dr is reduced in the same loop;
    inside an outer trace, dL/dr is reduced from dL/dz (:func:`grad_r_from_grad_z`).
    """
    numel = saved.numel()
    if workspace and saved.device.type == "cpu" and numel >= COMPILE_MIN_NUMEL and \
            not torch.compiler.is_compiling() and not _COMPILED.get("failed"):
        buf = _workspace(saved)
        if from_output:
            # learnable_sigmoid's (a tensor k) is slower with the floats as constants (bench_kernels: 16.4 ms
            # against 13.4 at (128, 32, 28, 28), 1 thread; 9.4 against 7.0 at 2)
            grad_z, grad_r, dk = _kernel("backward_from_output_into", tail_backward_from_output_terms_into, numel,
                                         specialize_floats=not isinstance(k, Tensor))(
                buf, grad, saved, r, k, bias, operator, need_k)
        elif operator in _SPLIT_BACKWARD:
            grad_z = _kernel("backward_pointwise_into", tail_backward_pointwise_into, numel)(
                buf, grad, saved, r, k, operator)
            grad_r, dk = _kernel("grad_r_from_grad_z", grad_r_from_grad_z, numel)(grad_z, saved, r), None
        else:
            options = _INLINE_ALL if operator == "sigmoid" else None
            grad_z, grad_r, dk = _kernel("backward_into", tail_backward_terms_into, numel, options=options)(
                buf, grad, saved, r, k, operator, need_k)
        return grad_z, grad_r, None if dk is None else dk.sum_to_size(k.shape)
    if from_output:
        terms = _kernel("backward_from_output", tail_backward_from_output_terms, numel)(
            grad, saved, r, k, bias, operator, need_k)
    elif workspace and torch.compiler.is_compiling():
        # dL/dz feeds the convolution's backward, so the outer compiler stores it; summed from that store, dL/dr
        # does not recompute dL/dc and the chain before it (BatchNorm's backward, the ReLU's mask, the tail) in a
        # loop nest of its own. Measured (bench_train_step --compile, widths (32, 48, 64), 32x32x3, 2 threads):
        # compiled step / compiled CNN 1.24-1.26x instead of 1.29-1.30x (linear), 1.08x instead of 1.13-1.14x
        # (cosine); sigmoid unchanged.
        grad_z, _, dk = tail_backward_terms(grad, saved, r, k, operator, need_k)
        return grad_z, grad_r_from_grad_z(grad_z, saved, r), None if dk is None else dk.sum_to_size(k.shape)
    else:
        terms = _kernel("backward", tail_backward_terms, numel)(grad, saved, r, k, operator, need_k)
    return reduce_tail_terms(terms, r, k, from_output)


class SphereTail(torch.autograd.Function):
    """g(z * r) (+ bias) with an analytic backward.

    ``SphereTail.apply(z, r, k, bias, operator, save)``:

    Args:
        z: the convolution with the filter-normalized weight, any shape (e.g. (N, C_out, *out), or
            (N, G, C_out / G, *out) for grouped convolutions, or (*, out_features)).
        r: reciprocal patch norms, broadcastable to ``z`` (e.g. (N, 1, *out), (N, G, 1, *out) or (*, 1)).
        k: the sigmoid k: None (cosine/linear), a number, or a tensor broadcastable to ``z`` (learnable k: it gets
            a gradient).
        bias: None or a tensor broadcastable to ``z``, added after g.
        operator: ``"linear"``, ``"cosine"``, ``"sigmoid"`` or ``"learnable_sigmoid"``.
        save: ``"z"``: save z (an in-place op on the output stays legal); ``"output"``: save the output and invert g
            in the backward (no full-size tensor of its own when the next layer saves the output anyway; see the
            module docstring, item 5); ``"output-inplace"``: as ``"output"``, and write the output into z's buffer
            (z must be a fresh tensor that nothing else uses, not a view; it is returned, marked dirty).

    Returns:
        g(z * r) (+ bias), shape of ``z``. Saves z or the output, r, k (and the bias when saving the output).
    """

    @staticmethod
    def forward(z: Tensor, r: Tensor, k: float | Tensor | None, bias: Tensor | None, operator: str,
                save: str) -> Tensor:
        inference = not any(isinstance(t, Tensor) and t.requires_grad for t in (z, r, k, bias))
        if check_choice("save", save, SAVES) == "output-inplace":
            return _kernel("forward_inplace", tail_forward_inplace, z.numel(), inference)(z, r, k, bias, operator)
        return _kernel("forward", tail_forward, z.numel(), inference)(z, r, k, bias, operator)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        z, r, k, bias, operator, save = inputs
        ctx.operator = operator
        ctx.save_output = save != "z"
        if save == "output-inplace":
            ctx.mark_dirty(z)
        ctx.k_float = None if isinstance(k, Tensor) else k  # a number stays a number: no host-to-device copy
        ctx.bias_shape = None if bias is None else bias.shape
        k_t = k if isinstance(k, Tensor) else None
        if ctx.save_output:
            ctx.save_for_backward(output, r, k_t, bias)
        else:
            ctx.save_for_backward(z, r, k_t)  # inputs only: the output is not kept

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        saved_tensors = saved_or_explain(ctx)
        saved, r, k_t = saved_tensors[0], saved_tensors[1], saved_tensors[2]
        k = ctx.k_float if k_t is None else k_t
        need_k = k_t is not None and ctx.needs_input_grad[2]
        grad = grad.contiguous()
        bias = saved_tensors[3] if ctx.save_output else None
        grad_z, grad_r, grad_k = tail_grads(grad, saved, r, k, bias, ctx.operator, ctx.save_output, need_k)
        grad_bias = None
        if ctx.bias_shape is not None and ctx.needs_input_grad[3]:
            grad_bias = grad.sum_to_size(ctx.bias_shape)
        return grad_z, grad_r, grad_k, grad_bias, None, None


def channel_square_sum(input: Tensor, groups: int) -> Tensor:
    """sum over each group's channels of input^2: (N, C, *spatial) -> (N, G, *spatial)."""
    n, c = input.shape[:2]
    sq = input * input
    return sq.sum(1, keepdim=True) if groups == 1 else sq.reshape(n, groups, c // groups, *input.shape[2:]).sum(2)


class ChannelSquareSum(torch.autograd.Function):
    """:func:`channel_square_sum` in one pass over the input, and its backward 2 x dL/ds in one more.

    Eager, ``x.square().sum(1)`` writes a full-size square and then reduces it along the strided channel axis, and its
    backward takes two full-size passes; on tensors of at least ``COMPILE_MIN_NUMEL`` elements the forward is one
    compiled reduction loop (measured: 2.6 ms instead of 22 ms for a (128, 64, 32, 32) input on one core). Saves
    the input only, which the convolution beside it saves anyway.
    """

    @staticmethod
    def forward(input: Tensor, groups: int) -> Tensor:
        return _kernel("square_sum", channel_square_sum, input.numel(), not input.requires_grad)(input, groups)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        input, groups = inputs
        ctx.groups = groups
        ctx.save_for_backward(input)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        (input,) = ctx.saved_tensors
        if ctx.groups == 1:
            return input * (2 * grad), None  # (N, C, *sp) * (N, 1, *sp)
        n, c = input.shape[:2]
        grouped = input.reshape(n, ctx.groups, c // ctx.groups, *input.shape[2:])
        return (grouped * (2 * grad).unsqueeze(2)).reshape(input.shape), None
