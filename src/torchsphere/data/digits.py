"""scikit-learn's bundled handwritten digits (no download), as 1-channel images.

``sklearn.datasets.load_digits`` ships 1,797 8x8 images with values 0..16 (the UCI *Optical Recognition of
Handwritten Digits* test set; E. Alpaydin, C. Kaynak, 1998). There is no official test split, so a stratified one is
carved with a fixed seed. The images are kept at 8x8 by default (fast; enough for small SphereNets with at most two
2x pools); ``image_size`` upsamples them bilinearly (e.g. 16 or 32 for deeper nets).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .splits import stratified_split

DIGITS_MAX = 16.0  # load_digits pixel values lie in 0..16
DIGITS_TEST_SEED = 0  # the test split is the same for every run seed


def read_digits(image_size: int = 8, test_fraction: float = 0.2) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
    """Loads the digits and splits off a fixed stratified test set.

    Args:
        image_size: output side in pixels; 8 keeps the originals, larger values upsample bilinearly.
        test_fraction: fraction of each class held out as the test set, in (0, 1).

    Returns:
        train images (N, 1, S, S) float32 in 0..16, train labels, test images, test labels (int64), class names.

    Raises:
        ImportError: scikit-learn is not installed.
        ValueError: bad ``image_size`` or ``test_fraction``.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int; got {image_size!r}")
    if not isinstance(test_fraction, (int, float)) or not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction!r}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError('the "digits" dataset needs scikit-learn: pip install "torchsphere[data]"') from err
    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1)  # (1797, 1, 8, 8)
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    if image_size != x.shape[-1]:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False).clamp(0, DIGITS_MAX)
    train, test = stratified_split(y, float(test_fraction), DIGITS_TEST_SEED)
    return x[train], y[train], x[test], y[test], [str(int(c)) for c in bunch.target_names]
