"""Using a saved run: ``load_run`` (config + model + data description), ``evaluate_run``, ``predict``.

A run folder is self-describing: ``config.yaml`` rebuilds the model, ``data.json`` gives the classes and input shape,
``model.safetensors`` holds the latest (at the end: final) weights and ``best.safetensors`` the best-on-validation
weights.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import bn_stats
from .builders import build_data, build_model
from .checkpoint import BEST_FILE, MODEL_FILE, load_weights
from .config import TrainConfig
from .loop import CONFIG_FILE, DATA_FILE, evaluate

WEIGHTS = {"final": MODEL_FILE, "best": BEST_FILE}
# how the values of an input array are read (see load_inputs)
PIXELS: tuple[str, ...] = ("auto", "raw", "unit", "normalized")


@dataclass
class LoadedRun:
    config: TrainConfig
    model: nn.Module
    data_info: dict[str, Any]
    weights: str


def load_run(run_dir: str | os.PathLike, weights: str = "final", device: str | torch.device = "cpu") -> LoadedRun:
    """Rebuilds the model of ``run_dir`` and loads its ``final`` (model.safetensors) or ``best`` weights (eval mode).

    Raises:
        FileNotFoundError: ``run_dir`` is not a run folder or lacks the weights file.
        ValueError: unknown ``weights`` choice.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"unknown weights {weights!r}; choose from {list(WEIGHTS)}")
    run_dir = Path(run_dir)
    for name in (CONFIG_FILE, DATA_FILE, WEIGHTS[weights]):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{str(run_dir)!r} is not a finished run folder: {name} is missing")
    config = TrainConfig.from_yaml(run_dir / CONFIG_FILE)
    info = json.loads((run_dir / DATA_FILE).read_text())
    model = build_model(config, info["num_classes"], info["in_channels"], tuple(info["image_size"]))
    load_weights(model, run_dir / WEIGHTS[weights], device=device)
    model.to(device).eval()
    return LoadedRun(config, model, info, weights)


def evaluate_run(run_dir: str | os.PathLike, weights: str = "final", *, split: str = "test",
                 data_dir: str | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 500, precise_bn: int = 0) -> dict[str, Any]:
    """Accuracy and loss of a saved model on the run's ``test`` or ``val`` split (rebuilt from its config).

    Args:
        precise_bn: when > 0, the BatchNorm statistics are first re-estimated on that many batches (the run's batch
            size) of the run's training split, without augmentation (:func:`torchsphere.train.bn_stats.precise_bn`).
    """
    if split not in ("test", "val"):
        raise ValueError(f"unknown split {split!r}; choose from ['test', 'val']")
    if isinstance(precise_bn, bool) or not isinstance(precise_bn, int) or precise_bn < 0:
        raise ValueError(f"precise_bn must be an integer >= 0; got {precise_bn!r}")
    run = load_run(run_dir, weights, device)
    config = run.config if data_dir is None else run.config.replace(data_dir=data_dir)
    if precise_bn:
        bn_stats.require_bn(run.model, "precise BN")
    data = build_data(config)
    if precise_bn:
        batches = bn_stats.precise_bn_batches(data.train_x, precise_bn, config.batch_size, config.seed)
        bn_stats.precise_bn(run.model, batches, device=torch.device(device))
    x, y = (data.test_x, data.test_y) if split == "test" else (data.val_x, data.val_y)
    acc, loss = evaluate(run.model, x, y, batch_size=batch_size)
    return dict(run=str(run_dir), weights=weights, split=split, dataset=config.dataset, samples=int(y.numel()),
                accuracy=acc, loss=loss, precise_bn=precise_bn)


def load_inputs(paths: list[str | os.PathLike], in_channels: int, image_size: tuple[int, int], *,
                pixels: str = "auto", resize: bool = False) -> Tensor:
    """Reads images for prediction into a normalized (N, C, H, W) float32 batch.

    Accepted files: ``.npy`` / ``.pt`` arrays of shape (H, W), (N, H, W), (N, C, H, W) or (N, H, W, C), and image
    files (``.png``, ``.jpg``, ...; Pillow needed). The model sees the official normalization ``(x - 127.5) / 128``
    of 0..255 pixels.

    Args:
        paths: the files.
        in_channels: channels the model takes (images are converted to grey or RGB accordingly).
        image_size: (height, width) the model takes.
        pixels: how array values are read: ``"raw"`` 0..255 pixels (any dtype), ``"unit"`` 0..1 floats (the
            ``torchvision.transforms.ToTensor`` convention), ``"normalized"`` already ``(x - 127.5) / 128``;
            ``"auto"`` (default): integer arrays are raw, float arrays within [0, 1] are unit, other float arrays are
            normalized. Image files are always raw.
        resize: resize images of another size to ``image_size`` (bilinear, antialiased); without it such an input is
            an error.

    Raises:
        FileNotFoundError: a file does not exist.
        ValueError: a file that is neither an array nor an image, or of the wrong shape / size.
    """
    return load_named_inputs(paths, in_channels, image_size, pixels=pixels, resize=resize)[0]


def load_named_inputs(paths: list[str | os.PathLike], in_channels: int, image_size: tuple[int, int], *,
                      pixels: str = "auto", resize: bool = False) -> tuple[Tensor, list[str]]:
    """:func:`load_inputs` plus a name per image: the file name, with ``[i]`` for the images of an array file."""
    from ..data import normalize_pixels

    if pixels not in PIXELS:
        raise ValueError(f"unknown pixels {pixels!r}; choose from {list(PIXELS)}")
    batches, names = [], []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"input file {str(path)!r} does not exist")
        x, is_array = _read_any(path, in_channels)
        single = x.dim() == 2 or not is_array
        x = _to_nchw(x, in_channels, image_size, path, resize)
        kind = pixels if is_array else "raw"
        if kind == "auto":
            kind = "raw" if not x.is_floating_point() else (
                "unit" if x.numel() and float(x.min()) >= 0 and float(x.max()) <= 1 else "normalized")
        x = x.float()
        batches.append(x if kind == "normalized" else normalize_pixels(x * 255 if kind == "unit" else x))
        names += [str(path)] if single and x.shape[0] == 1 else [f"{path}[{i}]" for i in range(x.shape[0])]
    return torch.cat(batches), names


def _read_any(path: Path, in_channels: int) -> tuple[Tensor, bool]:
    """(the file's tensor, True for an array file / False for an image file); unreadable files are ValueErrors."""
    try:
        if path.suffix == ".npy":
            import numpy as np

            return torch.from_numpy(np.load(path, allow_pickle=False)), True
        if path.suffix == ".pt":
            x = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(x, Tensor):
                raise ValueError(f"holds a {type(x).__name__}, not a tensor")
            return x, True
        return _read_image(path, in_channels), False
    except ImportError:
        raise
    except Exception as exc:  # noqa: BLE001 -- any reader failure is a bad input file
        raise ValueError(f"{str(path)!r} is neither a .npy / .pt array nor an image file Pillow can read "
                         f"({type(exc).__name__}: {exc})") from None


def predict(run_dir: str | os.PathLike, inputs: Tensor | list[str | os.PathLike], *, weights: str = "final",
            top_k: int = 1, device: str | torch.device = "cpu", pixels: str = "auto",
            resize: bool = False) -> list[list[tuple[int, str, float]]]:
    """Top-``k`` (class index, class name, probability) per input image of a saved model.

    ``inputs`` is a normalized (N, C, H, W) tensor or a list of files, read by :func:`load_inputs` with ``pixels``
    and ``resize``.
    """
    return _predict(load_run(run_dir, weights, device), inputs, top_k, device, pixels, resize)[0]


def predict_files(run_dir: str | os.PathLike, paths: list[str | os.PathLike], *, weights: str = "final",
                  top_k: int = 1, device: str | torch.device = "cpu", pixels: str = "auto",
                  resize: bool = False) -> list[dict[str, Any]]:
    """:func:`predict` on files, one ``{"input": name, "top": [(index, class, probability), ...]}`` per image."""
    results, names = _predict(load_run(run_dir, weights, device), list(paths), top_k, device, pixels, resize)
    return [{"input": name, "top": top} for name, top in zip(names, results)]


def _predict(run: LoadedRun, inputs, top_k: int, device, pixels: str, resize: bool):
    info = run.data_info
    names = None
    if not isinstance(inputs, Tensor):
        inputs, names = load_named_inputs(list(inputs), info["in_channels"], tuple(info["image_size"]),
                                          pixels=pixels, resize=resize)
    if not 1 <= top_k <= info["num_classes"]:
        raise ValueError(f"top_k must be in [1, {info['num_classes']}]; got {top_k!r}")
    with torch.no_grad():
        probs = run.model(inputs.to(device)).float().softmax(dim=1)  # (N, K)
    values, indices = probs.topk(top_k, dim=1)
    results = [[(int(i), info["classes"][int(i)], float(v)) for v, i in zip(vs, ids)]
               for vs, ids in zip(values, indices)]
    return results, names or [str(i) for i in range(len(results))]


def _read_image(path: Path, in_channels: int) -> Tensor:
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - Pillow ships with matplotlib
        raise ImportError(f"reading {path.suffix} images needs Pillow: pip install pillow") from exc
    import numpy as np

    with Image.open(path) as image:
        array = np.asarray(image.convert("L" if in_channels == 1 else "RGB"))
    return torch.from_numpy(array.copy())


def _to_nchw(x: Tensor, channels: int, size: tuple[int, int], path: Path, resize: bool = False) -> Tensor:
    if x.dim() == 2:
        x = x[None, None]
    elif x.dim() == 3:
        x = x[:, None] if channels == 1 and x.shape[-1] != 1 else (x.permute(2, 0, 1)[None] if x.shape[-1] == channels
                                                                 else x[None])
    elif x.dim() == 4 and x.shape[1] != channels and x.shape[-1] == channels:
        x = x.permute(0, 3, 1, 2)
    if x.dim() == 4 and x.shape[1] == channels and tuple(x.shape[-2:]) != tuple(size) and resize:
        integer = not x.is_floating_point()
        x = torch.nn.functional.interpolate(x.double(), size=tuple(size), mode="bilinear", align_corners=False,
                                            antialias=True)
        x = x.round().clamp(0, 255).to(torch.uint8) if integer else x.float()
    if x.dim() != 4 or x.shape[1] != channels or tuple(x.shape[-2:]) != tuple(size):
        hint = (" (pass --resize / resize=True to resize them)" if x.dim() == 4 and x.shape[1] == channels
                else "")
        raise ValueError(f"{str(path)!r}: expected images of {channels} channel(s) and size {tuple(size)}; got "
                         f"shape {tuple(x.shape)}{hint}")
    return x
