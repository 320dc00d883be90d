"""The SphereConv layer as one autograd node: filter normalization, convolution, patch norm and tail.

Liu et al., *Deep Hyperspherical Learning*, NIPS 2017 (arXiv 1711.03189). :mod:`torchsphere.functional.fused` made
the tail one node; this module makes the whole layer one node (:class:`SphereConvFn`), so that nothing of the layer
runs as a separate autograd op and every full-size pass is one loop:

- forward: w_hat = w / sqrt(|w|^2 + eps) (on the small weight), the reciprocal patch norm
  r = 1 / sqrt(box_sum(sum_c x^2) + eps) (one compiled loop over x plus a small window sum; before the
  convolution, while x is still in the cache from the layer that wrote it), z = conv(x, w_hat), then the tail
  g(z r) (+ bias), written over z's buffer when the output is saved;
- backward: the tail's analytic backward (dL/dz, dL/dr, dL/dk), one ``aten.convolution_backward`` for the input and
  the normalized weight, the patch norm's gradient added to the input gradient in the same buffer in one loop, and
  the weight normalization's gradient dL/dw = s (g - <w_hat, g> w_hat) with s = 1 / sqrt(|w|^2 + eps).

Numerical hazards handled here:

- **Overflow of the squared norms.** In float32, x^2 overflows for |x| > 1.8e19 and the squared patch norm for
  smaller |x|; then r = 0 and the layer would silently output g(0). The squared sums are accumulated in float32
  and, when any is infinite, recomputed in float64 (checked on the small (N, G, *out) result). Inside an outer
  ``torch.compile`` or ``torch.export``, which cannot branch on data, the loop over x on CPU also sums the squares
  of x 2^-80, used where the plain ones overflowed (:func:`patch_rnorm_pair_kernel`); on CUDA, where the check
  would synchronize, the squares are always accumulated in float64. The filter norm is computed in float32 on
  CPU where no square overflows or underflows, else in float64 (:func:`normalize_weight`).
- **Underflow in the patch norm's gradient.** dL/dx = 2 x box_sum^T(-r^3 dL/dr / 2), and r^3 underflows float32 for
  |patch| > ~5e12. With a per-sample scale a = max r, the factors are regrouped as 2 (x a)(a box_sum^T(v)),
  v = -(r / a)^2 (r dL/dr) / 2, each of which is O(1) or of the output's own scale.

Used for float32 and float64 tensors with the padding as integers (or ``"valid"``, or ``"same"`` when symmetric) and
no autocast; other cases take the composition of :func:`torchsphere.functional.conv._sphere_conv_fused`. Double
backward is not supported (``once_differentiable``), as for the fused tail.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import fused
from .fused import _box_padding, _kernel, saved_or_explain, tail_forward, tail_grads

_CONV = (F.conv1d, F.conv2d, F.conv3d)
_CONV_BACKWARD = torch.ops.aten.convolution_backward  # the layer's own convolution's (benchmarks time it apart)


def int_padding(padding, kernel: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[int, ...] | None:
    """The convolution's padding as one int per spatial dim, or None when ``"same"`` needs asymmetric padding."""
    nd = len(kernel)
    if padding == "valid":
        return (0,) * nd
    if padding == "same":
        total = [d * (k - 1) for d, k in zip(dilation, kernel)]
        return None if any(t % 2 for t in total) else tuple(t // 2 for t in total)
    return (padding,) * nd if isinstance(padding, int) else tuple(int(p) for p in padding)


def _window_sum(s: Tensor, kernel: tuple[int, ...], stride: tuple[int, ...], padding: tuple[int, ...],
                dilation: tuple[int, ...], box: bool) -> Tensor:
    """Sum of ``s`` (N, G, *spatial) over every window of the convolution (zero padding), (N, G, *out)."""
    nd = len(kernel)
    if box and nd == 2:
        return F.avg_pool2d(s, kernel, stride, padding, False, True, 1)
    if box and nd == 3:
        return F.avg_pool3d(s, kernel, stride, padding, False, True, 1)
    groups = s.shape[1]
    ones = torch.ones((groups, 1, *kernel), dtype=s.dtype, device=s.device)
    return _CONV[nd - 1](s, ones, None, stride, padding, dilation, groups)


def _window_sum_t(v: Tensor, like: torch.Size, kernel: tuple[int, ...], stride: tuple[int, ...],
                  padding: tuple[int, ...], dilation: tuple[int, ...], box: bool) -> Tensor:
    """The transpose of :func:`_window_sum`: (N, G, *out) -> (N, G, *spatial) of shape ``like``.

    With stride 1 the transpose of a zero-padded window sum is again one, with padding k - 1 - p: computed as the
    sum pool's forward where the pooling op allows that padding, which Inductor vectorizes (its lowering of the
    pool's backward is a scalar loop; the patch-norm gradient at (128, 32, 28, 28), 1 thread: 0.73 ms instead of
    1.13).
    """
    nd = len(kernel)
    flipped = tuple(k - 1 - p for k, p in zip(kernel, padding))
    if box and nd in (2, 3) and all(s == 1 for s in stride) and all(0 <= f and 2 * f <= k
                                                                      for f, k in zip(flipped, kernel)):
        return _window_sum(v, kernel, stride, flipped, dilation, True)
    if box and nd == 2:
        return torch.ops.aten.avg_pool2d_backward(v, v.new_empty(like), list(kernel), list(stride), list(padding),
                                                  False, True, 1)
    if box and nd == 3:
        return torch.ops.aten.avg_pool3d_backward(v, v.new_empty(like), list(kernel), list(stride), list(padding),
                                                  False, True, 1)
    groups = like[1]
    ones = torch.ones((groups, 1, *kernel), dtype=v.dtype, device=v.device)
    return torch.ops.aten.convolution_backward(v, v.new_empty(like), ones, None, list(stride), list(padding),
                                               list(dilation), False, [0] * nd, groups, [True, False, False])[0]


def _square_sum(x: Tensor, groups: int, dtype: torch.dtype) -> Tensor:
    """sum over each group's channels of x^2, accumulated in ``dtype``: (N, C, *sp) -> (N, G, *sp)."""
    x = x.to(dtype)
    return fused.channel_square_sum(x, groups)


def patch_sq_kernel(x: Tensor, kernel, stride, padding, dilation, groups: int, box: bool,
                    dtype: torch.dtype) -> Tensor:
    """Squared patch norms (N, G, *out) accumulated in ``dtype`` (one loop over x, then the window sum)."""
    return _window_sum(_square_sum(x, groups, dtype), kernel, stride, padding, dilation, box)


def patch_rnorm_kernel(x: Tensor, kernel, stride, padding, dilation, groups: int, box: bool, dtype: torch.dtype,
                       eps: float) -> tuple[Tensor, Tensor]:
    """(r, overflowed): r = 1 / sqrt(|x_patch|^2 + eps) (N, G, *out) in x's dtype from squares accumulated in
    ``dtype``, and whether any squared patch norm overflowed to inf (0-d bool), in one kernel."""
    sq = patch_sq_kernel(x, kernel, stride, padding, dilation, groups, box, dtype)
    return torch.rsqrt(sq + eps).to(x.dtype), torch.isinf(sq).any()


def patch_grad_kernel(grad_input: Tensor, x: Tensor, r: Tensor, grad_r: Tensor, kernel, stride, padding, dilation,
                      groups: int, box: bool) -> Tensor:
    """grad_input + d(r)/dx^T grad_r, written into grad_input (see the module docstring for the scaling).

    r, grad_r: (N, G, *out); x, grad_input: (N, C, *spatial).
    """
    n, c = x.shape[:2]
    nd = x.dim() - 2
    a = r.reshape(n, -1).amax(1).clamp_min(torch.finfo(r.dtype).tiny).reshape(n, *([1] * (r.dim() - 1)))
    v = (r / a).square() * (r * grad_r) * -0.5  # (N, G, *out), O(grad_r * r)
    q = _window_sum_t(v, torch.Size((n, groups, *x.shape[2:])), kernel, stride, padding, dilation, box) * (2 * a)
    xa = x * a.reshape(n, 1, *([1] * nd))  # x a: O(1 / sqrt(window))
    if groups == 1:
        return grad_input.copy_(grad_input + xa * q)
    shape = (n, groups, c // groups, *x.shape[2:])
    return grad_input.copy_((grad_input.reshape(shape) + xa.reshape(shape) * q.unsqueeze(2)).reshape(x.shape))


def _patch_rnorm(x: Tensor, kernel, stride, padding, dilation, groups: int, box: bool, eps: float,
                 inference: bool) -> Tensor:
    """r = 1 / sqrt(|x_patch|^2 + eps) in x's dtype, overflow-safe (module docstring).

    The kernel's size counts the window sum as well as x: a one-channel input (a grayscale image) is small, but
    aten's sum pool over it is a scalar loop, slower than the compiled kernel (in the SphereNet-9 step, 1 thread:
    0.8 ms against 0.4 ms for a (128, 1, 28, 28) input).
    """
    work = x.numel() + x.numel() // x.shape[1] * groups * math.prod(kernel)
    args = (x, kernel, stride, padding, dilation, groups, box)
    if x.dtype == torch.float64 or x.device.type != "cpu":
        return _kernel("patch_rnorm64", patch_rnorm_kernel, work, inference)(*args, torch.float64, eps)[0]
    if torch.compiler.is_compiling():  # a trace cannot branch on data
        return patch_rnorm_pair_kernel(*args, eps)
    r, overflowed = _kernel("patch_rnorm", patch_rnorm_kernel, work, inference)(*args, x.dtype, eps)
    if overflowed:  # a squared norm overflowed float32: redo in float64
        r = patch_rnorm_kernel(*args, torch.float64, eps)[0]
    return r


_SAFE_SCALE_EXP = 80  # (x 2^-80)^2 of float32's largest values sums without overflow over 4e9 terms


def patch_rnorm_pair_kernel(x: Tensor, kernel, stride, padding, dilation, groups: int, box: bool,
                            eps: float) -> Tensor:
    """r = 1 / sqrt(|x_patch|^2 + eps) in float32 without a branch on data: from the sums of x^2 and of (x s)^2,
    s = 2^-80, taken in the same loop over x (Inductor fuses the two reductions), the second where the first
    overflowed.

    Where the scaled sum is used, |x_patch|^2 > 3.4e38, so it is > 2e-10: far above what it loses to underflow, and
    eps s^2 is below its rounding, so r = s / sqrt(scaled sum), down to float32's subnormals as in the float64 path.
    Under ``torch.compile(model)`` on CPU this float32 pair makes the SphereNet-9 step (cosine, widths
    (32, 48, 64), 32x32x3, 2 threads) 1.09-1.11x its compiled CNN, against 1.13-1.19x with float64 squares, whose
    conversion halves the loop's vector width.
    """
    args = (kernel, stride, padding, dilation, groups, box)
    sq = patch_sq_kernel(x, *args, x.dtype)
    sq_scaled = patch_sq_kernel(x * 2.0 ** -_SAFE_SCALE_EXP, *args, x.dtype)
    return torch.where(torch.isinf(sq), torch.rsqrt(sq_scaled) * 2.0 ** -_SAFE_SCALE_EXP, torch.rsqrt(sq + eps))


_FILTER_SQ_MIN = 1e-20  # a float32 |w|^2 + eps below this may have lost squares to underflow: float64 instead


def normalize_weight(weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(w_hat, s): the filters scaled to unit norm, w_hat = s w in ``weight``'s dtype, with the (C_out,) scales
    s = (|w|^2 + eps)^(-1/2).

    A float32 weight on CPU is normalized in float32 when every |w|^2 is finite and |w|^2 + eps >= 1e-20 (where the
    squares that underflowed to zero or to subnormals change the sum by less than 1e-18 of itself); otherwise,
    and on other devices (where the check would synchronize) or inside a trace (which cannot branch on data), in
    float64, so that the squares of weights as large as 1e30 or as small as 1e-30 neither overflow nor underflow.
    ``s`` is in the dtype the norm was computed in; :func:`normalize_weight_backward` takes the same path.
    """
    shape = (-1, *([1] * (weight.dim() - 1)))
    if weight.dtype == torch.float32 and weight.device.type == "cpu" and not torch.compiler.is_compiling():
        sq = weight.square().flatten(1).sum(1)
        low, high = torch.aminmax(sq)
        if high.item() < math.inf and low.item() + eps >= _FILTER_SQ_MIN:
            w_scale = torch.rsqrt(sq + eps)
            return weight * w_scale.reshape(shape), w_scale
    w64 = weight.to(torch.float64)
    w_scale = torch.rsqrt(w64.square().flatten(1).sum(1) + eps)
    return (w64 * w_scale.reshape(shape)).to(weight.dtype), w_scale


def normalize_weight_backward(grad_w_hat: Tensor, weight: Tensor, w_hat: Tensor, w_scale: Tensor) -> Tensor:
    """dL/dw from dL/dw_hat = g for :func:`normalize_weight`: s (g - <w_hat, g> w_hat) per filter.

    In float32 from the saved w_hat when the forward took the float32 path and <w_hat, g> is finite (|w_hat| = 1,
    so it overflows only when g nearly does); otherwise in float64 from w and s."""
    shape = (-1, *([1] * (weight.dim() - 1)))
    if w_scale.dtype == grad_w_hat.dtype == torch.float32:
        dot = (grad_w_hat * w_hat).flatten(1).sum(1)
        if torch.isfinite(dot).all():
            return torch.addcmul(grad_w_hat, dot.reshape(shape), w_hat, value=-1).mul_(w_scale.reshape(shape))
    s64 = w_scale.to(torch.float64).reshape(shape)
    g64 = grad_w_hat.to(torch.float64)
    wh64 = weight.to(torch.float64) * s64
    dot = (g64 * wh64).flatten(1).sum(1).reshape(shape)
    return ((g64 - dot * wh64) * s64).to(weight.dtype)


def _grouped(z: Tensor, groups: int) -> tuple[int, ...]:
    n, c_out, *out_sp = z.shape
    return (n, groups, c_out // groups, *out_sp) if groups > 1 else tuple(z.shape)


class SphereConvFn(torch.autograd.Function):
    """g(theta(w, x_patch)) (+ bias) of an N-d convolution as one node.

    ``SphereConvFn.apply(input, weight, bias, k, stride, padding, dilation, groups, operator, eps, save_output,
    inference)``
    with ``stride``, ``padding``, ``dilation`` tuples of ints (one per spatial dim), ``k`` None, a number or a
    (C_out,) tensor (the learnable k, which gets a gradient), ``save_output`` as
    ``fused.saves_output(memory_efficient)`` and ``inference`` True when no gradient will be taken (then no kernel
    waits for its first compilation). Returns
    (out, z, w_hat, w_scale, r): the layer's output first, (N, G, C_out / G, *out) for grouped convolutions (the
    caller reshapes it, outside the node, so that an in-place op on it is seen by autograd); the others are non-differentiable intermediates kept for
    the backward (z is None when the output is saved instead); the caller uses the output only.
    """

    @staticmethod
    def forward(input: Tensor, weight: Tensor, bias: Tensor | None, k, stride, padding, dilation, groups: int,
                operator: str, eps: float, save_output: bool, inference: bool):
        nd = weight.dim() - 2
        kernel = tuple(weight.shape[2:])
        w_hat, w_scale = normalize_weight(weight, eps)
        box = _box_padding(padding, kernel, dilation) is not None
        r = _patch_rnorm(input, kernel, stride, padding, dilation, groups, box, eps, inference)  # (N, G, *out)
        z = _CONV[nd - 1](input, w_hat, None, stride, padding, dilation, groups)  # (N, C_out, *out)
        grouped = _grouped(z, groups)
        if groups > 1:  # (N, G, C_out / G, *out); r broadcasts over C_out / G
            z, r_b = z.view(grouped), r.unsqueeze(2)
        else:
            r_b = r
        channel = (1, *grouped[1:-nd], *([1] * nd))
        kt = k.reshape(channel) if isinstance(k, Tensor) and k.numel() > 1 else k
        b = None if bias is None else bias.reshape(channel)
        if save_output and groups == 1 and not torch.compiler.is_compiling():  # z is ours and no view: write over it
            out = _kernel("forward_inplace", fused.tail_forward_inplace, z.numel(), inference)(z, r_b, kt, b,
                                                                                              operator)
        else:
            out = _kernel("forward", tail_forward, z.numel(), inference)(z, r_b, kt, b, operator)
        return out, (None if save_output else z), w_hat, w_scale, r

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        input, weight, bias, k, stride, padding, dilation, groups, operator, eps, save_output, _ = inputs
        out, z, w_hat, w_scale, r = output
        ctx.mark_non_differentiable(*(t for t in (z, w_hat, w_scale, r) if t is not None))
        ctx.conv = (stride, padding, dilation, groups)
        ctx.operator = operator
        ctx.save_output = save_output
        ctx.k_float = None if isinstance(k, Tensor) else k
        ctx.k_shape = None if not isinstance(k, Tensor) else k.shape
        ctx.has_bias = bias is not None
        ctx.save_for_backward(input, weight, out if save_output else z, w_hat, w_scale, r,
                              k if isinstance(k, Tensor) else None,
                              bias if save_output else None)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor, *unused):
        input, weight, saved, w_hat, w_scale, r, k_t, bias = saved_or_explain(ctx)
        stride, padding, dilation, groups = ctx.conv
        nd = weight.dim() - 2
        kernel = tuple(weight.shape[2:])
        channel = (1, *saved.shape[1:-nd], *([1] * nd))
        k = ctx.k_float if k_t is None else (k_t.reshape(channel) if k_t.numel() > 1 else k_t)
        need_k = k_t is not None and ctx.needs_input_grad[3]
        rt = r.unsqueeze(2) if groups > 1 else r
        b = None if bias is None else bias.reshape(channel)
        grad_z, grad_r, grad_k = tail_grads(grad.contiguous(), saved, rt, k, b, ctx.operator, ctx.save_output,
                                            need_k, workspace=True)  # grad_z is consumed below
        grad_z = grad_z.reshape(saved.shape[0], -1, *saved.shape[-nd:])  # (N, C_out, *out)
        grad_r = grad_r.reshape(r.shape)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_input = grad_weight = grad_bias = None
        if need_x or need_w:
            grad_input, grad_w_hat, _ = _CONV_BACKWARD(
                grad_z, input, w_hat, None, list(stride), list(padding), list(dilation), False, [0] * nd, groups,
                [need_x, need_w, False])
            if need_x:
                box = _box_padding(padding, kernel, dilation) is not None
                grad_input = _kernel("patch_grad", patch_grad_kernel, input.numel())(
                    grad_input, input, r, grad_r, kernel, stride, padding, dilation, groups, box)
            if need_w:
                grad_weight = normalize_weight_backward(grad_w_hat, weight, w_hat, w_scale)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum_to_size(channel).reshape(-1)
        if grad_k is not None:
            grad_k = grad_k.reshape(ctx.k_shape)
        return grad_input, grad_weight, grad_bias, grad_k, None, None, None, None, None, None, None, None


def sphere_conv_fn(nd: int, input: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation,
                   groups: int, operator: str, k, eps: float, memory_efficient: bool) -> Tensor | None:
    """The one-node SphereConv, or None when this case takes the composed path (see the module docstring)."""
    if weight.dtype not in (torch.float32, torch.float64) or input.dtype != weight.dtype:
        return None
    if torch.is_autocast_enabled(input.device.type):
        return None
    stride_t = (stride,) * nd if isinstance(stride, int) else tuple(stride)
    dilation_t = (dilation,) * nd if isinstance(dilation, int) else tuple(dilation)
    pad = int_padding(padding, tuple(weight.shape[2:]), dilation_t)
    if pad is None:
        return None
    if bias is not None and bias.dtype != weight.dtype:
        return None
    k_arg = k.to(weight.dtype) if isinstance(k, Tensor) else k
    # inference (no_grad, inference_mode or nothing requires a gradient): never wait for a first compilation
    inference = not torch.is_grad_enabled() or not any(
        isinstance(t, Tensor) and t.requires_grad for t in (input, weight, bias, k_arg))
    out = SphereConvFn.apply(input, weight, bias, k_arg, stride_t, pad, dilation_t, groups, operator, eps,
                             fused.saves_output(memory_efficient), inference)[0]
    return out.reshape(out.shape[0], -1, *out.shape[-nd:]) if groups > 1 else out
