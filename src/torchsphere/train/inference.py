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


def load_inputs(paths: list[str | os.PathLike], in_channels: int, image_size: tuple[int, int]) -> Tensor:
    """Reads images for prediction into a normalized (N, C, H, W) float32 batch.

    Accepted files: ``.npy`` / ``.pt`` arrays of shape (H, W), (N, H, W), (N, C, H, W) or (N, H, W, C), and image
    files (``.png``, ``.jpg``, ...; Pillow needed). Integer arrays and images are raw 0..255 pixels and get the official
    normalization ``(x - 127.5) / 128``; float arrays are taken as already normalized.
    """
    from ..data import normalize_pixels

    batches = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"input file {str(path)!r} does not exist")
        if path.suffix == ".npy":
            import numpy as np

            x = torch.from_numpy(np.load(path))
        elif path.suffix == ".pt":
            x = torch.load(path, map_location="cpu", weights_only=True)
        else:
            x = _read_image(path, in_channels)
        x = _to_nchw(x, in_channels, image_size, path)
        batches.append(x.float() if x.is_floating_point() else normalize_pixels(x))
    return torch.cat(batches)


def predict(run_dir: str | os.PathLike, inputs: Tensor | list[str | os.PathLike], *, weights: str = "final",
            top_k: int = 1, device: str | torch.device = "cpu") -> list[list[tuple[int, str, float]]]:
    """Top-``k`` (class index, class name, probability) per input image of a saved model."""
    run = load_run(run_dir, weights, device)
    info = run.data_info
    if not isinstance(inputs, Tensor):
        inputs = load_inputs(list(inputs), info["in_channels"], tuple(info["image_size"]))
    if not 1 <= top_k <= info["num_classes"]:
        raise ValueError(f"top_k must be in [1, {info['num_classes']}]; got {top_k!r}")
    with torch.no_grad():
        probs = run.model(inputs.to(device)).float().softmax(dim=1)  # (N, K)
    values, indices = probs.topk(top_k, dim=1)
    return [[(int(i), info["classes"][int(i)], float(v)) for v, i in zip(vs, ids)]
            for vs, ids in zip(values, indices)]


def _read_image(path: Path, in_channels: int) -> Tensor:
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - Pillow ships with matplotlib
        raise ImportError(f"reading {path.suffix} images needs Pillow: pip install pillow") from exc
    import numpy as np

    with Image.open(path) as image:
        array = np.asarray(image.convert("L" if in_channels == 1 else "RGB"))
    return torch.from_numpy(array.copy())


def _to_nchw(x: Tensor, channels: int, size: tuple[int, int], path: Path) -> Tensor:
    if x.dim() == 2:
        x = x[None, None]
    elif x.dim() == 3:
        x = x[:, None] if channels == 1 and x.shape[-1] != 1 else (x.permute(2, 0, 1)[None] if x.shape[-1] == channels
                                                                 else x[None])
    elif x.dim() == 4 and x.shape[1] != channels and x.shape[-1] == channels:
        x = x.permute(0, 3, 1, 2)
    if x.dim() != 4 or x.shape[1] != channels or tuple(x.shape[-2:]) != tuple(size):
        raise ValueError(f"{str(path)!r}: expected images of {channels} channel(s) and size {tuple(size)}; got "
                         f"shape {tuple(x.shape)}")
    return x
