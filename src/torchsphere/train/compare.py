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
reused and an interrupted one resumed, so rerunning an interrupted comparison only trains what is missing.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

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
    """The TrainConfig of every (configuration, seed); ``overrides`` (command-line flags) beat the spec."""
    output = Path(output)
    configs: dict[str, list[TrainConfig]] = {}
    for entry in spec.runs:
        fields = {k: v for k, v in entry.items() if k != "name"}
        configs[entry["name"]] = [
            TrainConfig.from_dict({**spec.train, **fields, **(overrides or {}), "seed": seed,
                                   "output": str(output / "runs" / entry["name"] / f"seed_{seed}")})
            for seed in spec.seeds]
    return configs


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
            resume = (out / CONFIG_FILE).is_file() and _same_config(config, out)
            if (out / CONFIG_FILE).is_file() and not resume:
                raise ValueError(f"{str(out)!r} holds a run with another configuration; remove it or use another "
                                 f"--output")
            train(config.replace(resume=resume))


def _same_config(config: TrainConfig, out: Path) -> bool:
    saved = TrainConfig.from_yaml(out / CONFIG_FILE).to_dict()
    now = config.to_dict()
    return all(now[k] == saved.get(k) for k in now if k not in RESUME_FREE)
