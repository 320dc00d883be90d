"""Batch augmentation on tensors, on the training device, reproducible through a ``torch.Generator``.

The official CIFAR recipes (wy1iu/SphereNet, Liu et al., NIPS 2017; wy1iu/MHE, Liu et al., NeurIPS 2018):
- CIFAR-10 (SphereNet-9): random horizontal flip only (``"flip"``).
- CIFAR-10+ (SphereResNet-32) and the MHE CIFAR-100 recipe: 4-pixel *symmetric* padding (mirror including the edge
  pixel, torchvision's ``padding_mode="symmetric"``, TF's ``mode="SYMMETRIC"``), random 32x32 crop, random horizontal
  flip (``"cifar10+"``).

Every operation is vectorized over the batch: one draw of per-sample offsets and flip decisions, then a single
gather of the output pixels — no Python loop over samples, no padded copy, no PIL. Random numbers are drawn on the
generator's device (CPU generator -> CPU draws, moved to the data), so a CPU generator drives augmentation of CUDA
batches identically to CPU batches.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

PAD_MODES = ("constant", "symmetric", "reflect")
CIFAR_PADDING = 4  # pixels, official CIFAR-10+ / CIFAR-100 recipe


def _check_images(x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor of images (N, C, H, W); got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"x must be a batch of images (N, C, H, W); got shape {tuple(x.shape)}")
    return x


def _draw_device(x: Tensor, generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else x.device


def _source_index(pos: Tensor, size: int, mode: str) -> tuple[Tensor, Tensor | None]:
    """Maps padded-frame positions ``pos`` (may fall outside [0, size)) to source indices, with a validity mask."""
    if mode == "constant":
        valid = (pos >= 0) & (pos < size)
        return pos.clamp(0, size - 1), valid
    if mode == "symmetric":  # ... 1 0 | 0 1 2 ... n-1 | n-1 n-2 ...
        pos = torch.where(pos < 0, -pos - 1, pos)
        return torch.where(pos >= size, 2 * size - 1 - pos, pos), None
    pos = torch.where(pos < 0, -pos, pos)  # reflect: ... 2 1 | 0 1 ... n-1 | n-2 ...
    return torch.where(pos >= size, 2 * size - 2 - pos, pos), None


def _gather(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``out[n, c, i, j] = x[n, c, rows[n, i], cols[n, j]]`` as one index_select over the flattened batch."""
    n, c, h, w = x.shape
    base = (torch.arange(n * c, device=x.device).view(n, c, 1, 1) * h + rows[:, None, :, None]) * w  # (N, C, h, 1)
    index = base + cols[:, None, None, :]  # (N, C, h, w)
    return x.reshape(-1).index_select(0, index.reshape(-1)).view(index.shape)


def _check_crop(x: Tensor, padding: object, mode: object, size: tuple[int, int] | None) -> tuple[int, int]:
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be an int >= 0; got {padding!r}")
    if mode not in PAD_MODES:
        raise ValueError(f"unknown pad mode {mode!r}; choose from {list(PAD_MODES)}")
    h, w = x.shape[-2:]
    out_h, out_w = (h, w) if size is None else size
    if not (0 < out_h <= h + 2 * padding and 0 < out_w <= w + 2 * padding):
        raise ValueError(f"crop size {size!r} must be positive and fit the padded image "
                         f"{(h + 2 * padding, w + 2 * padding)}")
    limit = min(h, w) if mode == "symmetric" else min(h, w) - 1
    if mode != "constant" and padding > limit:
        raise ValueError(f"{mode} padding needs padding <= {limit} for images of size {(h, w)}; got {padding}")
    return out_h, out_w


def _check_p(p: object) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be a probability in [0, 1]; got {p!r}")
    return float(p)


def crop_flip(x: Tensor, padding: int = 0, *, mode: str = "constant", size: tuple[int, int] | None = None,
              flip_p: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Padded random crop followed by a random horizontal flip, fused into one gather (no padded copy of the batch).

    The random draws happen in this order: row offsets (N), column offsets (N), then flip decisions (N) — exactly
    those of ``random_hflip(random_crop(x, ...), flip_p, ...)`` with the same generator, which this equals.

    Args:
        x: (N, C, H, W) images.
        padding: crop padding in pixels on each side (0 with ``size=None``: no crop, no offset drawn).
        mode: ``"constant"`` (zeros), ``"symmetric"`` or ``"reflect"``.
        size: (h, w) of the crop; defaults to (H, W).
        flip_p: flip probability, or None for no flip (and no draw).
        generator: source of the random numbers; None uses the global RNG of ``x``'s device.

    Returns:
        (N, C, h, w) images, same dtype and device as ``x``.
    """
    x = _check_images(x)
    out_h, out_w = _check_crop(x, padding, mode, size)
    n, _, h, w = x.shape
    dev = _draw_device(x, generator)
    row_ok = col_ok = None
    rows = torch.arange(out_h, device=x.device).expand(n, out_h)  # (N, h)
    cols = torch.arange(out_w, device=x.device).expand(n, out_w)  # (N, w)
    if padding > 0 or (out_h, out_w) != (h, w):
        off_y = torch.randint(0, h + 2 * padding - out_h + 1, (n, 1), generator=generator, device=dev).to(x.device)
        off_x = torch.randint(0, w + 2 * padding - out_w + 1, (n, 1), generator=generator, device=dev).to(x.device)
        rows, row_ok = _source_index(off_y + rows - padding, h, mode)
        cols, col_ok = _source_index(off_x + cols - padding, w, mode)
    if flip_p is not None:
        flip = torch.rand(n, generator=generator, device=dev).to(x.device) < _check_p(flip_p)
        cols = torch.where(flip[:, None], cols.flip(-1), cols)
        col_ok = None if col_ok is None else torch.where(flip[:, None], col_ok.flip(-1), col_ok)
    out = _gather(x, rows, cols)  # (N, C, h, w)
    if row_ok is not None and col_ok is not None:  # constant mode: zero what falls in the padding
        out = out * (row_ok[:, None, :, None] & col_ok[:, None, None, :]).to(out.dtype)  # (N, 1, h, w) mask
    return out


def random_crop(x: Tensor, padding: int, *, mode: str = "constant", size: tuple[int, int] | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """Pads each image by ``padding`` pixels on every side and takes a random crop, independently per sample.

    Equivalent to padding the batch (``torch.nn.functional.pad`` for ``"constant"`` (zeros) and ``"reflect"``;
    ``"symmetric"`` repeats the edge pixel, as torchvision and TensorFlow define it) and slicing ``size`` at a uniform
    random offset in ``[0, H + 2 * padding - size_h]`` x ``[0, W + 2 * padding - size_w]`` — but computed as one
    gather, without materializing the padded batch.

    Args:
        x: (N, C, H, W) images on any device.
        padding: pixels added on each side, >= 0 (``"reflect"`` needs ``padding < H, W``; ``"symmetric"``
            ``padding <= H, W``).
        mode: ``"constant"`` (zeros), ``"symmetric"`` or ``"reflect"``.
        size: (h, w) of the crop; defaults to (H, W).
        generator: source of the offsets; None uses the global RNG of ``x``'s device.

    Returns:
        (N, C, h, w) crops, same dtype and device as ``x``.
    """
    return crop_flip(x, padding, mode=mode, size=size, generator=generator)


def random_hflip(x: Tensor, p: float = 0.5, *, generator: torch.Generator | None = None) -> Tensor:
    """Flips each image left-right with probability ``p``, independently per sample.

    Args:
        x: (N, C, H, W) images.
        p: flip probability in [0, 1].
        generator: source of the decisions; None uses the global RNG of ``x``'s device.
    """
    return crop_flip(_check_images(x), flip_p=_check_p(p), generator=generator)


@dataclass(frozen=True)
class Augment:
    """A batch augmentation: optional padded random crop, then optional horizontal flip (one fused gather).

    Called as ``augment(x, generator)`` on an (N, C, H, W) batch; returns a new batch of the same shape (the input
    itself when nothing is enabled).

    Attributes:
        padding: crop padding in pixels (0: no crop).
        pad_mode: ``"constant"``, ``"symmetric"`` or ``"reflect"``.
        flip: whether to flip horizontally with probability 1/2.
    """

    padding: int = 0
    pad_mode: str = "constant"
    flip: bool = False

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if self.padding == 0 and not self.flip:
            return x
        return crop_flip(x, self.padding, mode=self.pad_mode, flip_p=0.5 if self.flip else None, generator=generator)


_AUGMENTS: dict[str, Augment] = {
    "none": Augment(),
    "flip": Augment(flip=True),  # official CIFAR-10 (SphereNet-9)
    "crop": Augment(padding=CIFAR_PADDING),
    "crop_flip": Augment(padding=CIFAR_PADDING, flip=True),  # zero padding, the common torchvision CIFAR recipe
    "crop_flip_reflect": Augment(padding=CIFAR_PADDING, pad_mode="reflect", flip=True),
    "crop_flip_symmetric": Augment(padding=CIFAR_PADDING, pad_mode="symmetric", flip=True),
    "cifar10+": Augment(padding=CIFAR_PADDING, pad_mode="symmetric", flip=True),  # official CIFAR-10+ / MHE CIFAR-100
}


def list_augments() -> list[str]:
    """Names accepted by :func:`make_augment`."""
    return list(_AUGMENTS)


def make_augment(name: str) -> Callable[[Tensor, torch.Generator | None], Tensor]:
    """The batch augmentation called ``name`` (see :func:`list_augments`).

    Raises:
        ValueError: unknown name (the message lists the choices).
    """
    if not isinstance(name, str) or name not in _AUGMENTS:
        raise ValueError(f"unknown augmentation {name!r}; choose from {list_augments()}")
    return _AUGMENTS[name]
