"""``torchsphere curves``: learning curves of several configurations (Hoiem et al., ICML 2021), trained and fitted.

Every configuration (a name plus :class:`TrainConfig` fields, as in ``compare``) is trained on every partition of the
measurement protocol (``torchsphere.data.partitions``: a validation split carved once with ``split_seed``, then
class-stratified disjoint partitions of the rest at N, N/2, ... per class), each run evaluated on the same validation
and test splits. The test error of every run (percent; of the best-on-validation weights by default) is one
measurement; ``torchsphere.analysis.fit_learning_curve`` fits each configuration's curve.

Budget rule, printed in the report: ``steps = --steps`` for every partition when given, else
``max(min_steps, ceil(epochs * n * C / batch_size))`` (``epochs`` passes over the partition, with a floor so that
small partitions are not under-trained); ``evaluations`` evaluation points per run, spread evenly.

Runs go to ``OUTPUT/runs/CONFIG/n{per_class}_p{index}``; a finished run (``summary.json``, same configuration) is
reused and an interrupted one resumed from its checkpoint, as in ``compare``.
"""
from __future__ import annotations

import copy
import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.partitions import DEFAULT_REPS, Partition, SizeSchedule, max_per_class, partition_schedule
from .checkpoint import atomic_write_text
from .compare import _same_config
from .config import TrainConfig, load_yaml
from .loop import CONFIG_FILE, train
from .metrics import SUMMARY_FILE, read_summary

MEASUREMENTS_FILE = "curves.csv"
FIT_FILE = "fit.json"
MEASURES = ("best", "final")
_SPEC_KEYS = {"title", "description", "train", "runs", "num_sizes", "reps", "N", "split_seed", "epochs", "steps",
              "min_steps", "evaluations", "measure", "gamma", "v1", "level"}
_SHARED_DATA_KEYS = ("dataset", "data_dir", "val_fraction", "limit_test", "dataset_kwargs")
CSV_FIELDS = ("config", "per_class", "total", "partition", "seed", "steps", "epochs", "test_error", "val_error",
              "final_test_error", "run")  # run: the run folder relative to the output folder


@dataclass
class CurvesSpec:
    """What to measure. ``runs`` entries are ``{"name": ..., **TrainConfig fields}``; ``train`` is shared by all.

    Attributes:
        num_sizes: sizes N, N/2, ..., N/2**(num_sizes-1) per class.
        reps: disjoint partitions per size, largest size first (default 1, 2, 4, 8, 16 cut to ``num_sizes``).
        N: the largest size per class (default: the smallest class of the training pool, i.e. all of it).
        split_seed: carves the validation split and orders the pool (the same for every size and configuration).
        epochs, steps, min_steps: the budget rule (module docstring); ``steps`` wins over ``epochs``.
        evaluations: evaluation points per run (best-on-validation selection among them).
        measure: ``"best"`` (test error of the best-on-validation weights) or ``"final"``.
        gamma, v1, level: passed to ``fit_learning_curve`` (None: search gamma / estimate v1).
    """

    runs: list[dict[str, Any]]
    train: dict[str, Any] = field(default_factory=dict)
    num_sizes: int = 5
    reps: list[int] | None = None
    N: int | None = None
    split_seed: int = 0
    epochs: float | None = 2.0
    steps: int | None = None
    min_steps: int = 100
    evaluations: int = 2
    measure: str = "best"
    gamma: float | None = None
    v1: float | None = None
    level: float = 0.95
    title: str = "torchsphere curves"
    description: str = ""

    def __post_init__(self) -> None:
        if not self.runs:
            raise ValueError("curves needs at least one run configuration; got none")
        names = [r.get("name") for r in self.runs]
        if any(not isinstance(n, str) or not n or "/" in n for n in names) or len(set(names)) != len(names):
            raise ValueError(f"every run needs a unique non-empty 'name' without '/'; got {names}")
        for key in ("num_sizes", "evaluations"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be an int >= 1; got {value!r}")
        for key in ("N", "steps"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{key} must be an int >= 1 or None; got {value!r}")
        if isinstance(self.min_steps, bool) or not isinstance(self.min_steps, int) or self.min_steps < 0:
            raise ValueError(f"min_steps must be an int >= 0; got {self.min_steps!r}")
        if self.steps is None and (self.epochs is None or isinstance(self.epochs, bool)
                                   or not isinstance(self.epochs, (int, float)) or not self.epochs > 0):
            raise ValueError(f"give a budget: steps, or epochs > 0; got epochs={self.epochs!r}")
        if self.measure not in MEASURES:
            raise ValueError(f"measure must be one of {list(MEASURES)}; got {self.measure!r}")
        if isinstance(self.split_seed, bool) or not isinstance(self.split_seed, int) or self.split_seed < 0:
            raise ValueError(f"split_seed must be an int >= 0; got {self.split_seed!r}")
        for key in ("steps", "epochs", "partition", "limit_train", "seed", "output"):
            if key in self.train or any(key in r for r in self.runs):
                raise ValueError(f"{key!r} is set by curves for every run; remove it from the train/runs entries")
        for key in _SHARED_DATA_KEYS:  # every configuration must see the same pool, validation and test sets
            if any(key in r for r in self.runs):
                raise ValueError(f"{key!r} must be the same for every configuration: set it under 'train', not in "
                                 f"a run entry")
        if self.num_sizes < 3:
            raise ValueError(f"a learning curve needs at least 3 sizes; got num_sizes={self.num_sizes}")
        if self.reps is not None:
            self.reps = [int(r) for r in self.reps]
            if len(self.reps) != self.num_sizes:
                raise ValueError(f"reps must give one count per size ({self.num_sizes} sizes); got {self.reps}")
            if self.v1 is None and max(self.reps) < 2:
                raise ValueError(f"with one partition per size (reps {self.reps}) the variance cannot be estimated: "
                                 f"repeat at least one size or give v1 (the lazy mode)")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CurvesSpec:
        unknown = sorted(set(values) - _SPEC_KEYS)
        if unknown:
            raise ValueError(f"unknown curves keys {unknown}; known keys: {sorted(_SPEC_KEYS)}")
        return cls(**copy.deepcopy(values))

    @classmethod
    def from_yaml(cls, path: str | Path) -> CurvesSpec:
        return cls.from_dict(load_yaml(path))

    def budget_rule(self) -> str:
        """The budget rule in words (printed in the report and the log)."""
        if self.steps is not None:
            return f"{self.steps} steps for every partition"
        return (f"steps = max({self.min_steps}, ceil({self.epochs:g} epochs x n x C / batch)) — {self.epochs:g} "
                f"passes over each partition, at least {self.min_steps} steps")

    def budget_steps(self, total: int, batch_size: int) -> int:
        """Training steps of a partition of ``total`` examples."""
        if self.steps is not None:
            return self.steps
        return max(self.min_steps, math.ceil(self.epochs * total / batch_size))


@dataclass(frozen=True)
class PlannedRun:
    """One training run of the protocol."""

    name: str
    partition: Partition
    config: TrainConfig


@dataclass(frozen=True)
class Plan:
    """Every run, with the schedule and the data facts behind it."""

    runs: list[PlannedRun]
    schedule: SizeSchedule
    num_classes: int
    pool_per_class: int
    val_size: int
    test_size: int
    dataset: str


def run_folder(name: str, partition: Partition) -> str:
    """The folder of one run, relative to the curves output: ``runs/CONFIG/n{per_class}_p{index}``."""
    return f"runs/{name}/n{partition.per_class}_p{partition.index}"


def plan_curves(spec: CurvesSpec, output: str | Path, overrides: dict[str, Any] | None = None) -> Plan:
    """Reads the dataset once (with the validation carve), chooses N and the schedule, and configures every run.

    Raises:
        ValueError: N larger than the pool allows, a schedule that does not fit, or a bad TrainConfig field.
    """
    from ..data import build_dataset

    overrides = dict(overrides or {})
    base = TrainConfig.from_dict({**spec.train, **overrides})
    data = build_dataset(base.dataset, base.data_dir, val_fraction=base.val_fraction, seed=spec.split_seed,
                         limit_test=base.limit_test, **base.dataset_kwargs)
    pool = max_per_class(data.train_y, data.num_classes)
    N = pool if spec.N is None else spec.N
    if N > pool:
        raise ValueError(f"N = {N} per class, but the training pool (after the validation split) has only {pool} "
                         f"examples in its smallest class")
    reps = spec.reps if spec.reps is not None else list(DEFAULT_REPS[::-1][:spec.num_sizes])
    schedule = partition_schedule(N, spec.num_sizes, reps)
    output = Path(output)
    runs = []
    for entry in spec.runs:
        fields = {k: v for k, v in entry.items() if k != "name"}
        for part in schedule.partitions(spec.split_seed):
            values = {**spec.train, **fields, **overrides}
            batch = values.get("batch_size", TrainConfig.batch_size)
            steps = spec.budget_steps(part.per_class * data.num_classes, batch)
            values.update(steps=steps, epochs=None, seed=part.index, partition=part.to_dict(),
                          eval_every=max(1, math.ceil(steps / spec.evaluations)),
                          output=str(output / run_folder(entry["name"], part)))
            runs.append(PlannedRun(entry["name"], part, TrainConfig.from_dict(values)))
    return Plan(runs, schedule, data.num_classes, pool, int(data.val_y.numel()), int(data.test_y.numel()),
                base.dataset)


def train_runs(plan: Plan, *, quiet: bool = False, refit_only: bool = False) -> None:
    """Trains every planned run not finished yet, with a progress bar over the runs (finished ones are reused)."""
    from tqdm.auto import tqdm

    todo = []
    for run in plan.runs:
        out = Path(run.config.output)
        if (out / SUMMARY_FILE).is_file() and _same_config(run.config, out):
            continue
        if (out / CONFIG_FILE).is_file() and not _same_config(run.config, out):
            raise ValueError(f"{str(out)!r} holds a run with another configuration; remove it or use another "
                             f"--output")
        todo.append(run)
    if refit_only and todo:
        missing = ", ".join(str(r.config.output) for r in todo[:5])
        raise FileNotFoundError(f"--refit-only: {len(todo)} of {len(plan.runs)} runs are not finished ({missing}"
                                f"{', ...' if len(todo) > 5 else ''}); run without --refit-only to train them")
    bar = tqdm(total=len(plan.runs), initial=len(plan.runs) - len(todo), desc="curves", unit="run",
               disable=quiet or not todo, dynamic_ncols=True)
    try:
        for run in todo:
            out = Path(run.config.output)
            bar.set_postfix_str(f"{run.name} n={run.partition.per_class} p{run.partition.index}", refresh=True)
            resume = (out / CONFIG_FILE).is_file()
            train(run.config.replace(resume=resume, quiet=True))
            bar.update(1)
    finally:
        bar.close()


def measurements(plan: Plan, measure: str = "best") -> list[dict[str, Any]]:
    """One row per finished run (the columns of ``curves.csv``); errors in percent."""
    rows = []
    for run in plan.runs:
        summary = read_summary(Path(run.config.output) / SUMMARY_FILE)
        chosen = summary[measure]
        rows.append(dict(config=run.name, per_class=run.partition.per_class,
                         total=run.partition.per_class * plan.num_classes, partition=run.partition.index,
                         seed=run.config.seed, steps=summary["steps"], epochs=summary["epochs"],
                         test_error=100.0 * (1.0 - chosen["test_acc"]),
                         val_error=100.0 * (1.0 - chosen["val_acc"]) if not math.isnan(chosen["val_acc"]) else "",
                         final_test_error=100.0 * (1.0 - summary["final"]["test_acc"]),
                         run=run_folder(run.name, run.partition)))
    return rows


def write_measurements(path: str | Path, rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buffer.getvalue())


def fit_all(spec: CurvesSpec, plan: Plan, rows: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The content of ``fit.json`` (per configuration the fit, each configuration against the first) and the fits."""
    import warnings

    from ..analysis import fit_learning_curve
    from ..analysis.comparison import compare_fits

    fits = {}
    for name in dict.fromkeys(r.name for r in plan.runs):
        mine = [r for r in rows if r["config"] == name]
        with warnings.catch_warnings():  # the notes are kept in the fit
            warnings.simplefilter("ignore", RuntimeWarning)
            fits[name] = fit_learning_curve([r["per_class"] for r in mine], [r["test_error"] for r in mine],
                                            plan.schedule.sizes[0], gamma=spec.gamma, v1=spec.v1, level=spec.level)
    names = list(fits)
    return dict(
        title=spec.title, n_unit="training samples per class", N=plan.schedule.sizes[0],
        sizes=list(plan.schedule.sizes),
        reps=list(plan.schedule.reps), num_classes=plan.num_classes, dataset=plan.dataset, val_size=plan.val_size,
        test_size=plan.test_size, split_seed=spec.split_seed, budget_rule=spec.budget_rule(), measure=spec.measure,
        error_unit="percent test error", fits={k: v.to_dict() for k, v in fits.items()},
        comparisons={k: dict(baseline=names[0], **compare_fits(fits[names[0]], fits[k])) for k in names[1:]},
    ), fits


def run_curves(spec: CurvesSpec, output: str | Path, overrides: dict[str, Any] | None = None, *,
               quiet: bool = False, refit_only: bool = False) -> dict[str, Any]:
    """Plans, trains (reusing finished runs, resuming killed ones), fits and writes every output; returns fit.json."""
    from .curves_report import write_curves_report

    output = Path(output)
    plan = plan_curves(spec, output, overrides)
    print(f"curves: {len(plan.runs)} runs — sizes {list(plan.schedule.sizes)} per class x partitions "
          f"{list(plan.schedule.reps)} x {len({r.name for r in plan.runs})} configurations; budget: "
          f"{spec.budget_rule()}")
    train_runs(plan, quiet=quiet, refit_only=refit_only)
    rows = measurements(plan, spec.measure)
    write_measurements(output / MEASUREMENTS_FILE, rows)
    result, fits = fit_all(spec, plan, rows)
    atomic_write_text(output / FIT_FILE, json.dumps(result, indent=2) + "\n")
    write_curves_report(output, spec, plan, rows, result, fits)
    return result
