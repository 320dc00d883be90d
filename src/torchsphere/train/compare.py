"""``torchsphere compare``: train several configurations on the same data, seeds and budget, then report.

A comparison is a mapping (a preset shipped in ``torchsphere/train/presets/*.yaml``, a YAML file, or built from the
command line)::

    title: CNN-9 vs SphereNet-9 on Fashion-MNIST
    seeds: [0, 1]                    # every configuration runs with each seed
    thresholds: [0.80, 0.85]         # "steps to reach" columns (test accuracy)
    fallback_dataset: digits         # used, with a message, when the dataset's files are missing
    fallback_train: {steps: 300}     # train overrides for the fallback
    train: {dataset: fashion-mnist, steps: 600, batch_size: 64, width_mult: 0.125}   # TrainConfig fields, shared
    runs:                            # one entry per configuration: a name plus TrainConfig fields
      - {name: cnn9, model: cnn9}
      - {name: spherenet9-linear, model: spherenet9, operator: linear}

Each run trains into ``OUTPUT/runs/NAME/seed_S``. A finished run (``summary.json`` present, same configuration) is
reused and an interrupted one resumed, so rerunning an interrupted comparison only trains what is missing. Every
folder is checked before anything trains: one that holds a run of another configuration is an error that lists the
fields that differ.

Command-line overrides apply to every configuration. Overrides that make two configurations identical (``--operator``
when the runs differ by operator, ``--model`` when they differ by model) are refused, since the report would compare
identical runs under different names; overrides that keep them distinct (a shorter ``--steps`` for a smoke test) are
fine.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from . import preflight
from .checkpoint import STATE_FILE
from .config import TrainConfig, load_yaml
from .loop import CONFIG_FILE, RESUME_FREE, train
from .metrics import SUMMARY_FILE
from .report import ConfigResult, write_report

log = logging.getLogger("torchsphere.compare")
_SPEC_KEYS = {"title", "description", "seeds", "thresholds", "fallback_dataset", "fallback_train", "train", "runs"}


@dataclass
class CompareSpec:
    """What to compare; ``runs`` entries are ``{"name": ..., **TrainConfig fields}``."""

    runs: list[dict[str, Any]]
    train: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    thresholds: list[float] = field(default_factory=lambda: [0.8, 0.9])
    title: str = "torchsphere compare"
    description: str = ""
    fallback_dataset: str | None = None
    fallback_train: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.runs:
            raise ValueError("a comparison needs at least one run configuration; got none")
        names = [r.get("name") for r in self.runs]
        if any(not isinstance(n, str) or not n for n in names) or len(set(names)) != len(names):
            raise ValueError(f"every run needs a unique non-empty 'name'; got {names}")
        if not self.seeds:
            raise ValueError("seeds must list at least one seed; got []")
        if any(not 0 < t <= 1 for t in self.thresholds):
            raise ValueError(f"thresholds are accuracies in (0, 1]; got {self.thresholds}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CompareSpec:
        unknown = sorted(set(values) - _SPEC_KEYS)
        if unknown:
            raise ValueError(f"unknown compare keys {unknown}; known keys: {sorted(_SPEC_KEYS)}")
        return cls(**copy.deepcopy(values))


def list_presets() -> list[str]:
    """Names of the presets shipped with the package."""
    folder = resources.files("torchsphere.train") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_spec(preset_or_path: str) -> CompareSpec:
    """A shipped preset by name (``demo``) or a YAML file by path."""
    if preset_or_path in list_presets():
        import yaml

        text = (resources.files("torchsphere.train") / "presets" / f"{preset_or_path}.yaml").read_text()
        return CompareSpec.from_dict(yaml.safe_load(text))
    path = Path(preset_or_path)
    if not path.is_file():
        raise ValueError(f"unknown preset {preset_or_path!r}: neither a shipped preset {list_presets()} nor a file")
    return CompareSpec.from_dict(load_yaml(path))


def spec_from_models(models: list[str], operators: list[str] | None, seeds: int, train_kwargs: dict[str, Any],
                     thresholds: list[float]) -> CompareSpec:
    """One configuration per model; models named ``*sphere*`` get one configuration per operator."""
    runs = []
    for model in models:
        if operators and "sphere" in model:
            runs += [{"name": f"{model}-{op}", "model": model, "operator": op} for op in operators]
        else:
            runs.append({"name": model, "model": model})
    return CompareSpec(runs=runs, train=dict(train_kwargs), seeds=list(range(seeds)), thresholds=thresholds)


def run_configs(spec: CompareSpec, output: str | Path, overrides: dict[str, Any] | None = None
                ) -> dict[str, list[TrainConfig]]:
    """The TrainConfig of every (configuration, seed); ``overrides`` (command-line flags) beat the spec.

    Raises:
        ValueError: overrides that make two configurations identical, a setting that a configuration would ignore
            (``margin`` without the gasoftmax head, ...), or a configuration that cannot run
            (:func:`~torchsphere.train.preflight.check_config`), named.
    """
    output = Path(output)
    overrides = dict(overrides or {})
    configs: dict[str, list[TrainConfig]] = {}
    for entry in spec.runs:
        fields = {k: v for k, v in entry.items() if k != "name"}
        given = {**spec.train, **fields, **overrides}
        configs[entry["name"]] = [
            TrainConfig.from_dict({**given, "seed": seed,
                                   "output": str(output / "runs" / entry["name"] / f"seed_{seed}")})
            for seed in spec.seeds]
        try:
            preflight.check_given(given, configs[entry["name"]][0])
            preflight.check_config(configs[entry["name"]][0])
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"configuration {entry['name']!r}: {exc}") from None
    _check_distinct(spec, configs, overrides)
    return configs


# fields that say what a configuration *is*: an override may not replace a value a configuration sets itself
IDENTITY_FIELDS = ("model", "operator", "sigmoid_k", "head", "head_operator", "margin", "norm", "regularizer")


def _check_distinct(spec: CompareSpec, configs: dict[str, list[TrainConfig]], overrides: dict[str, Any]) -> None:
    """Raises ValueError when an override replaces what a configuration is (its model, operator, head, ... set in
    the spec) or leaves two configurations identical (but for their names and folders)."""
    rewritten = {k: [e["name"] for e in spec.runs if k in e and e[k] != overrides[k]]
                 for k in overrides if k in IDENTITY_FIELDS}
    rewritten = {k: names for k, names in rewritten.items() if names}
    if rewritten:
        raise ValueError("overrides would rewrite what the configurations are: " + "; ".join(
            f"{preflight.flag(k)} {overrides[k]!r} replaces the {k} of {', '.join(names)}"
            for k, names in rewritten.items()) + ". Leave the flag out (--operators OP1,OP2 compares operators)")
    seen: dict[str, str] = {}
    for name, cfgs in configs.items():
        key = repr(sorted((k, v) for k, v in preflight.resolved(cfgs[0].to_dict()).items() if k != "output"))
        if key in seen:
            other = seen[key]
            culprits = [k for k in overrides if any(k in e for e in spec.runs if e["name"] in (name, other))]
            raise ValueError(f"configurations {other!r} and {name!r} are identical after the overrides"
                             + (f" ({', '.join(f'{preflight.flag(k)} {overrides[k]!r}' for k in culprits)} replaced "
                                f"what distinguished them)" if culprits else "")
                             + "; leave the flag out, or use --operators OP1,OP2 to compare operators")
        seen[key] = name


def check_folders(configs: dict[str, list[TrainConfig]]) -> None:
    """Raises ValueError, listing the differences, if a run folder holds a run of another configuration."""
    for name, cfgs in configs.items():
        for config in cfgs:
            out = Path(config.output)
            if (out / CONFIG_FILE).is_file():
                diff = _config_diff(config, out)
                if diff:
                    raise ValueError(f"{str(out)!r} ({name}, seed {config.seed}) holds a run with another "
                                     f"configuration ({', '.join(diff)}); remove it or use another --output")


def compare(spec: CompareSpec, output: str | Path, overrides: dict[str, Any] | None = None, *,
            quiet: bool = False) -> str:
    """Trains every configuration × seed (reusing finished runs), writes the report; returns the markdown table."""
    overrides = dict(overrides or {})
    try:
        configs = run_configs(spec, output, {**overrides, "quiet": quiet})
        _train_all(configs)
    except FileNotFoundError as exc:
        if spec.fallback_dataset is None or "dataset" in overrides:
            raise
        print(f"{exc}\n-> falling back to dataset {spec.fallback_dataset!r}")
        overrides = {**spec.fallback_train, **overrides, "dataset": spec.fallback_dataset}
        configs = run_configs(spec, output, {**overrides, "quiet": quiet})
        _train_all(configs)
    results = [ConfigResult.from_runs(name, [c.output for c in cfgs]) for name, cfgs in configs.items()]
    notes = spec.description
    return write_report(results, output, spec.thresholds, title=spec.title, notes=notes)


def _train_all(configs: dict[str, list[TrainConfig]]) -> None:
    check_folders(configs)
    total = sum(len(c) for c in configs.values())
    done = 0
    for name, cfgs in configs.items():
        for config in cfgs:
            done += 1
            out = Path(config.output)
            if (out / SUMMARY_FILE).is_file() and _same_config(config, out):
                print(f"[{done}/{total}] {name} seed {config.seed}: finished earlier, reused ({out})")
                continue
            print(f"[{done}/{total}] {name} seed {config.seed} -> {out}")
            resume = (out / STATE_FILE).is_file() and _same_config(config, out)
            train(config.replace(resume=resume))


def _config_diff(config: TrainConfig, out: Path) -> list[str]:
    return preflight.config_diff(config, TrainConfig.from_yaml(out / CONFIG_FILE).to_dict(), RESUME_FREE)


def _same_config(config: TrainConfig, out: Path) -> bool:
    return not _config_diff(config, out)
