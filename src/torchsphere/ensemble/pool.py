"""A pool of trained models: run folders found under the paths given, named, and described from their configs."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..train.checkpoint import MODEL_FILE
from ..train.loop import CONFIG_FILE, DATA_FILE


@dataclass(frozen=True)
class PoolMember:
    """One trained run of the pool: a unique ``name`` (its path below the pool roots) and its folder."""

    name: str
    path: Path


def is_run_folder(path: Path) -> bool:
    """A finished torchsphere run folder: ``config.yaml``, ``data.json`` and ``model.safetensors``."""
    return all((path / f).is_file() for f in (CONFIG_FILE, DATA_FILE, MODEL_FILE))


def find_pool(paths: list[str | os.PathLike]) -> list[PoolMember]:
    """The run folders given, or found below the folders given (sorted, depth-first), in the order of ``paths``.

    A member's name is its path relative to the folder given (the folder's own name for a run folder given
    directly); with several folders, relative to their common parent. Path components named ``runs`` (the folder
    that ``torchsphere compare`` trains into) are left out of names. A run found twice counts once.

    Raises:
        ValueError: no paths, or no run folder found (an empty pool).
        FileNotFoundError: a path that does not exist.
    """
    if not paths:
        raise ValueError("the pool is empty: give at least one run folder or folder of runs (--pool DIR ...)")
    members: list[PoolMember] = []
    seen: set[Path] = set()
    common = Path(os.path.commonpath([str(Path(p).resolve()) for p in paths])) if len(paths) > 1 else None
    for given in map(Path, paths):
        if not given.exists():
            raise FileNotFoundError(f"pool path {str(given)!r} does not exist")
        if is_run_folder(given):
            found = [given]
        else:
            found = sorted({p.parent for p in given.rglob(CONFIG_FILE) if is_run_folder(p.parent)})
        for run in found:
            if run.resolve() in seen:
                continue
            seen.add(run.resolve())
            if common is not None:
                rel = run.resolve().relative_to(common).as_posix()
            else:
                rel = run.name if run == given else run.relative_to(given).as_posix()
            name = "/".join(part for part in rel.split("/") if part != "runs") or run.name
            members.append(PoolMember(name, run))
    if not members:
        raise ValueError(f"the pool is empty: no finished run folder (config.yaml + data.json + model.safetensors) "
                         f"in {[str(p) for p in paths]}")
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        members = [PoolMember(str(m.path), m.path) for m in members]  # fall back to the paths themselves
    return members


def slug(name: str) -> str:
    """A folder name for a member name (``cnn9/seed_0`` -> ``cnn9__seed_0``)."""
    return name.replace(os.sep, "__").replace("/", "__").replace(" ", "_")
