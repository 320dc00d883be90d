"""ImageNet-style class-per-folder image datasets, decoded once into an in-memory uint8 tensor.

Layout, as torchvision's ``ImageFolder`` expects it: ``root/<class>/<image>`` with class names the sorted
subdirectory names. Either ``root/train/`` plus ``root/test/`` (or ``val/`` / ``validation/``) hold the two splits,
or ``root`` itself holds the classes and a stratified test split is carved from it with a fixed seed.

Decoding uses Pillow, the image loader of torchvision's ``ImageFolder`` (``torchvision.io``'s decoders are deprecated
since torchvision 0.29 and read fewer formats); both come with ``pip install "torchsphere[vision]"``. Each image is
converted to RGB (or greyscale), its shorter side resized to ``image_size`` and the centre cropped to a square — the
usual evaluation transform — once, at load time; training never touches PIL. Everything is held in memory, so this
reader is meant for small folders or for a capped subset (``limit_train`` / ``limit_test`` of ``build_dataset``
decode only the selected files).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .splits import stratified_split

# the file suffixes torchvision's ImageFolder accepts
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
TEST_FOLDERS = ("test", "val", "validation")
FOLDER_TEST_SEED = 0  # the carved test split is the same for every run seed
VISION_HINT = 'pip install "torchsphere[vision]"'


def _pil_image():
    try:
        from PIL import Image
    except ImportError as err:
        raise ImportError(f"reading image folders needs Pillow (installed with torchvision): {VISION_HINT}") from err
    return Image


def _scan(directory: Path, classes: list[str] | None = None) -> tuple[list[Path], list[int], list[str]]:
    """Image files and labels under ``directory/<class>/`` (recursively, sorted).

    Without ``classes`` (a training folder) the classes are the sorted subfolders and each must hold an image; with
    ``classes`` (a test folder) the subfolders must be among them and may be missing or empty.
    """
    found = sorted(d.name for d in directory.iterdir() if d.is_dir())
    training = classes is None
    if classes is None:
        classes = found
        if not classes:
            raise ValueError(f"{directory}: no class subfolders found (expected {directory}/<class>/<image>)")
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ValueError(f"{directory}: class folders {unknown} are not among the training classes {classes}")
    files, labels = [], []
    for label, name in enumerate(classes):
        folder = directory / name
        images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file()) \
            if folder.is_dir() else []
        if not images and training:
            raise ValueError(f"{folder}: no images with a suffix in {IMG_EXTENSIONS}")
        files += images
        labels += [label] * len(images)
    return files, labels, classes


class ImageFiles(Sequence):
    """A list of image files that decodes to a (n, C, S, S) uint8 tensor when indexed with an index tensor.

    Args:
        files: image paths.
        image_size: side S of the square output.
        channels: 3 (RGB) or 1 (greyscale).
    """

    def __init__(self, files: list[Path], image_size: int, channels: int) -> None:
        self.files = list(files)
        self.image_size = image_size
        self.channels = channels

    def __len__(self) -> int:
        return len(self.files)

    def decode(self, path: Path) -> np.ndarray:
        """One image as an (S, S, C) uint8 array: shorter side resized to S (bilinear, antialiased), centre crop."""
        image_mod = _pil_image()
        s = self.image_size
        with image_mod.open(path) as img:
            img = img.convert("RGB" if self.channels == 3 else "L")
            w, h = img.size
            scale = s / min(w, h)
            nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
            img = img.resize((nw, nh), image_mod.BILINEAR)
            left, top = (nw - s) // 2, (nh - s) // 2
            arr = np.asarray(img.crop((left, top, left + s, top + s)), dtype=np.uint8)
        return arr.reshape(s, s, self.channels)

    def __getitem__(self, index):
        if isinstance(index, int):
            return torch.from_numpy(self.decode(self.files[index])).permute(2, 0, 1)  # (C, S, S)
        idx = torch.as_tensor(index, dtype=torch.long).reshape(-1).tolist()
        out = np.empty((len(idx), self.image_size, self.image_size, self.channels), dtype=np.uint8)
        for row, i in enumerate(idx):
            out[row] = self.decode(self.files[i])
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()  # (n, C, S, S)


def read_image_folder(root: str | os.PathLike, image_size: int = 32, channels: int = 3, test_fraction: float = 0.2
                      ) -> tuple[ImageFiles, Tensor, ImageFiles, Tensor, list[str]]:
    """Scans a class-per-folder dataset (no decoding yet).

    Args:
        root: the dataset folder (with ``train/`` and ``test/``/``val/``, or the class folders directly).
        image_size: side of the square images produced.
        channels: 3 for RGB, 1 for greyscale.
        test_fraction: fraction of each class carved as the test split when ``root`` has no separate test folder.

    Returns:
        lazy train images, train labels, lazy test images, test labels and the class names.

    Raises:
        ImportError: Pillow (torchvision) is not installed.
        FileNotFoundError: ``root`` does not exist.
        ValueError: bad arguments or a folder without images.
    """
    _pil_image()  # fail early, before scanning, when the decoder is missing
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int; got {image_size!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3; got {channels!r}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    test_dir = next((root / n for n in TEST_FOLDERS if (root / n).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        train_files, train_y, classes = _scan(root / "train")
        test_files, test_y, _ = _scan(test_dir, classes)
    else:
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction!r}")
        files, labels, classes = _scan(root)
        keep, held = stratified_split(torch.tensor(labels), test_fraction, FOLDER_TEST_SEED)
        train_files, test_files = [files[i] for i in keep], [files[i] for i in held]
        train_y, test_y = [labels[i] for i in keep], [labels[i] for i in held]
    return (ImageFiles(train_files, image_size, channels), torch.tensor(train_y, dtype=torch.long),
            ImageFiles(test_files, image_size, channels), torch.tensor(test_y, dtype=torch.long), classes)
