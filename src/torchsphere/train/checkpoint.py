"""Atomic, resumable checkpoints.

A run folder holds ``model.safetensors`` (the weights, safetensors — no pickle), ``checkpoint.pt`` (the full trainer
state: optimizer, lr scheduler, A-Softmax lambda schedule, regularizer state, RNG states of torch / python / numpy /
the data generator, step, epoch, best-so-far, metrics rows) and ``best.safetensors`` (the best-on-validation weights).
``checkpoint.pt`` holds only tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(..., weights_only=True)`` (PyTorch's safe unpickler). ``checkpoint.pt`` also carries the
model's state_dict, so it is self-contained: resuming never mixes weights and trainer state of different steps, whatever
moment a crash hits.

Every file is written atomically: to a temporary file in the same folder, flushed and fsync'ed, then moved over the
target with ``os.replace`` (atomic on POSIX within one file system), and the folder is fsync'ed. A crash in the middle
of a write leaves the previous file intact. The files get the mode a plain ``open()`` would give them (0666 minus the
umask, e.g. 0644), so colleagues sharing a folder can read a run.
"""
from __future__ import annotations

import io
import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

MODEL_FILE = "model.safetensors"
BEST_FILE = "best.safetensors"
STATE_FILE = "checkpoint.pt"


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Writes ``path`` through ``write(file)`` atomically (temporary file in the same folder, fsync, os.replace).

    Args:
        path: the target file.
        write: called with a binary file object open for writing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):  # mkstemp creates 0600 files; give the mode open() would: 0666 minus the umask
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    """The process umask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_weights(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Saves the unwrapped model's weights as safetensors, atomically (shared tensors are handled)."""
    from safetensors.torch import save_model

    def write(f: BinaryIO) -> None:
        # save_model takes a file name: write next to the target, then copy the bytes into the atomic writer
        with tempfile.TemporaryDirectory(dir=Path(path).parent) as tmp:
            name = os.path.join(tmp, "w.safetensors")
            save_model(unwrap(model), name, metadata=metadata)
            with open(name, "rb") as src:
                f.write(src.read())

    atomic_write(path, write)


def load_weights(model: nn.Module, path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Loads safetensors weights into the unwrapped ``model`` (strict)."""
    from safetensors.torch import load_model

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    load_model(unwrap(model), str(path), strict=True, device=str(device))
    return model


def read_weights_metadata(path: str | os.PathLike) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def rng_state(data_generator: torch.Generator | None = None) -> dict[str, Any]:
    """The RNG states of torch (CPU and CUDA), python and numpy (as tensors/lists: weights_only-safe)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _python_state_to_list(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached": float(cached)}
    except ImportError:
        pass
    if data_generator is not None:
        state["data"] = data_generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], data_generator: torch.Generator | None = None) -> None:
    """Restores what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    random.setstate(_python_state_from_list(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        s = state["numpy"]
        np.random.set_state((s["kind"], s["keys"].numpy().astype("uint32"), s["pos"], s["has_gauss"], s["cached"]))
    if data_generator is not None and "data" in state:
        data_generator.set_state(state["data"])


def _python_state_to_list(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_state_from_list(state: list) -> tuple:
    version, internal, gauss = state
    return version, tuple(internal), gauss


def save_checkpoint(run_dir: str | os.PathLike, model: nn.Module, state: dict[str, Any]) -> None:
    """Writes ``model.safetensors`` then ``checkpoint.pt`` atomically.

    Args:
        run_dir: the run folder.
        model: the model (wrappers are removed).
        state: the trainer state; must contain ``"step"``; only weights_only-safe values.
    """
    run_dir = Path(run_dir)
    step = int(state["step"])
    save_weights(model, run_dir / MODEL_FILE, metadata={"step": str(step)})
    buffer = io.BytesIO()
    torch.save({**state, "model": unwrap(model).state_dict()}, buffer)
    atomic_write_bytes(run_dir / STATE_FILE, buffer.getvalue())


def load_checkpoint(run_dir: str | os.PathLike, model: nn.Module | None = None,
                    device: str | torch.device = "cpu") -> dict[str, Any]:
    """Loads ``checkpoint.pt`` with ``weights_only=True`` (and its weights into ``model`` when given).

    Raises:
        FileNotFoundError: no checkpoint in ``run_dir``.
    """
    run_dir = Path(run_dir)
    path = run_dir / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint {STATE_FILE!r} in run folder {str(run_dir)!r}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if model is not None:
        unwrap(model).load_state_dict(state["model"])
    return state
