"""The first steps of a training run, measured with :class:`torchsphere.analysis.gradient_flow.GradientFlow`.

``measure_gradient_flow(config, steps, every)`` sets the run up exactly as ``torchsphere train`` does (same data,
initial weights, optimizer, lr schedule of the full budget ``config.steps``, augmentation and batch order), trains
its first ``steps`` optimizer steps with :func:`torchsphere.train.loop.train_step` while the monitor records every
``every``-th step, and writes ``grad_flow.csv`` (columns :data:`torchsphere.analysis.gradient_flow.COLUMNS`, the
step's training loss included) beside the run's ``config.yaml`` and ``data.json`` in ``config.output``. No
evaluation and no checkpoint: a measurement is short, and an interrupted one is simply started again. The steps
measured are the first steps of the training run of the same configuration, since the monitor changes nothing.

Command line: ``torchsphere gradflow --model spherenet30 --norm none --measure-steps 50 --every 5 --output DIR``
(every ``torchsphere train`` option applies). See docs/training.md.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..analysis.gradient_flow import GradientFlow, write_csv
from . import checkpoint as ckpt
from . import distributed as dist_utils
from .builders import epoch_permutation
from .config import TrainConfig
from .loop import setup, torch_threads, train_step

GRAD_FLOW_FILE = "grad_flow.csv"
GRAD_FLOW_INFO = "grad_flow.json"


def measure_gradient_flow(config: TrainConfig, steps: int, every: int = 1) -> dict[str, Any]:
    """Trains the first ``steps`` steps of ``config``'s run under the monitor; writes ``grad_flow.csv``.

    Args:
        config: the training configuration (its ``steps`` is the budget that shapes the lr schedule; its
            ``output`` receives ``config.yaml``, ``data.json``, ``grad_flow.csv`` and ``grad_flow.json``).
        steps: optimizer steps to train and measure (1 <= steps <= the run's budget).
        every: record steps 0, every, 2 * every, ... below ``steps``.

    Returns:
        ``{"steps", "every", "losses" (every step's training loss), "cpu_s", "wall_s", "csv"}``, also written
        (without the losses) to ``grad_flow.json``.

    Raises:
        ValueError: ``steps`` or ``every`` out of range, a run with sites or under DDP, or any configuration
            error that ``torchsphere train`` refuses.
    """
    for name, value in (("steps", steps), ("every", every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
    if config.sites is not None:
        raise ValueError("the gradient-flow measurement trains one model; got a configuration with sites "
                         f"(sites={config.sites!r})")
    with torch_threads(config.threads):
        run = setup(config)
        try:
            if run.info.enabled:
                raise ValueError("measure the gradient flow in a single process (no torchrun / DDP)")
            if steps > run.total:
                raise ValueError(f"steps ({steps}) must not exceed the run's budget of {run.total} steps "
                                 f"(config steps={config.steps!r}, epochs={config.epochs!r})")
            result = _train_measured(run, steps, every)
        finally:
            dist_utils.cleanup(run.info)
    return result


def _train_measured(run: Any, steps: int, every: int) -> dict[str, Any]:
    cfg, data = run.config, run.data
    wall, cpu = time.perf_counter(), time.process_time()
    losses: list[float] = []
    run.model.train()
    with GradientFlow(run.raw_model, run.optimizer, every=every) as flow:
        order, epoch = None, -1
        for step in range(steps):  # the batch order of train_one_epoch
            if step // run.per_epoch != epoch:
                epoch = step // run.per_epoch
                order = epoch_permutation(data.train_y.numel(), cfg.seed, epoch)
            batch = step - epoch * run.per_epoch
            indices = dist_utils.shard_batch(order[batch * cfg.batch_size:(batch + 1) * cfg.batch_size], run.info)
            loss, _ = train_step(run, data.train_x[indices], data.train_y[indices])
            losses.append(loss)
            flow.set_loss(step, loss)
    out = Path(cfg.output)
    path = write_csv(flow.rows, out / GRAD_FLOW_FILE)
    info = dict(steps=steps, every=every, layers=len(flow.layers), cpu_s=round(time.process_time() - cpu, 3),
                wall_s=round(time.perf_counter() - wall, 3), threads=cfg.threads, csv=path.name)
    ckpt.atomic_write_text(out / GRAD_FLOW_INFO, json.dumps(info, indent=2) + "\n")
    return {**info, "losses": losses, "csv": str(path)}
