"""Per-evaluation metrics (``metrics.csv``) and the run summary (``summary.json``), written atomically.

One row per evaluation point: ``step, epoch, lr, train_loss, train_acc, val_acc, test_acc, wall_time``.
``train_loss`` / ``train_acc`` average the training batches since the previous evaluation (the loss includes the
regularizers; the accuracy is measured on the augmented training batches, in training mode). ``val_acc`` drives model
selection. ``test_acc`` is a *reported* curve for convergence plots (the official logs evaluate the test set every 500
iterations too); it is never used to select a model. ``wall_time`` is the training time in seconds since the start of
the run, evaluations excluded, accumulated over resumptions.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_text

METRICS_FILE = "metrics.csv"
SUMMARY_FILE = "summary.json"
BN_DRIFT_FILE = "bn_drift.csv"
COLUMNS: tuple[str, ...] = ("step", "epoch", "lr", "train_loss", "train_acc", "val_acc", "test_acc", "wall_time")
DRIFT_COLUMNS: tuple[str, ...] = ("step", "layer", "index", "mean_rel_change", "var_rel_change", "var_mean")
_INT_COLUMNS = {"step", "epoch", "index"}


def write_metrics(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """Rewrites the whole CSV atomically (a few hundred rows at most: cheap, and never half-written).

    The base ``COLUMNS`` come first, then the optional columns of the run (``train_eval_acc``, ``test_acc_precise``,
    ``test_acc_<set>``, ...) in the order they first appear.
    """
    columns = list(COLUMNS)
    for row in rows:
        columns += [k for k in row if k not in columns]
    _write_csv(path, rows, columns)


def write_bn_drift(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """``bn_drift.csv``: one row per BatchNorm layer and evaluation window (``DRIFT_COLUMNS``)."""
    _write_csv(path, rows, list(DRIFT_COLUMNS))


def _write_csv(path: str | os.PathLike, rows: list[dict[str, Any]], columns: list[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _format(row.get(k)) for k in columns})
    atomic_write_text(path, buffer.getvalue())


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Reads ``metrics.csv`` back (ints for step/epoch, floats elsewhere, NaN for empty cells)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file {str(path)!r} does not exist")
    with path.open(newline="") as f:
        rows = []
        for raw in csv.DictReader(f):
            rows.append({k: (int(v) if k in _INT_COLUMNS else (_number(v) if v != "" else math.nan))
                         for k, v in raw.items()})
    return rows


def write_summary(path: str | os.PathLike, summary: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(summary, indent=2, sort_keys=False) + "\n")


def read_summary(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"summary file {str(path)!r} does not exist")
    return json.loads(path.read_text())


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:  # a text column (bn_drift.csv's layer names)
        return text


def _format(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return repr(value)  # exact round trip
    return str(value)
