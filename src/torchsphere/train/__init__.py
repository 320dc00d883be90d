"""Training and comparison: typed config, the loop, evaluation, atomic checkpoints, DDP, metrics and reports.

``train(TrainConfig(...))`` trains one run into a folder (``config.yaml``, ``metrics.csv``, ``summary.json``,
``model.safetensors``, ``best.safetensors``, ``checkpoint.pt``); ``compare(spec, output)`` trains several
configurations over seeds and writes ``report.md`` and ``convergence.png``; ``tune_cpu_allocator()`` keeps freed CPU
tensor memory in the process (glibc), which CPU training steps run faster with. The command line
(``torchsphere train`` / ``compare`` / ``evaluate`` / ``predict``) is a thin front over these functions; see
docs/training.md.
"""
from .allocator import tune_cpu_allocator
from .checkpoint import atomic_write, load_checkpoint, load_weights, save_checkpoint, save_weights
from .compare import CompareSpec, compare, list_presets, load_spec, spec_from_models
from .config import TrainConfig
from .distributed import DistInfo, init_distributed
from .inference import evaluate_run, load_run, predict
from .loop import evaluate, train, train_one_epoch
from .metrics import read_metrics, read_summary
from .report import ConfigResult, write_report

__all__ = [
    "CompareSpec",
    "ConfigResult",
    "DistInfo",
    "TrainConfig",
    "atomic_write",
    "compare",
    "evaluate",
    "evaluate_run",
    "init_distributed",
    "list_presets",
    "load_checkpoint",
    "load_run",
    "load_spec",
    "load_weights",
    "predict",
    "read_metrics",
    "read_summary",
    "save_checkpoint",
    "save_weights",
    "spec_from_models",
    "train",
    "train_one_epoch",
    "tune_cpu_allocator",
    "write_report",
]
