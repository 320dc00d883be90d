"""The training loop: ``train(config) -> summary``, with ``train_one_epoch`` and ``evaluate`` as plain functions.

One step (docs/architecture.md)::

    logits = model(x, labels)                                  # the head is inside the model (and inside DDP)
    loss = F.cross_entropy(logits, y, label_smoothing=...)     # or the official floored loss
           + orth * orthonormal_penalty(sphere layers) + regularizer()   # added explicitly
    backward -> optimizer.step -> lr scheduler.step -> A-Softmax lambda set on the head for the next step

Exact resume: the data order of an epoch is a permutation drawn from a generator seeded by (seed, epoch); the
augmentation generator, the torch / python / numpy RNGs, optimizer, schedulers, regularizer, metric accumulators, step
and best-so-far are all in ``checkpoint.pt``. A run killed at any moment and resumed with ``--resume`` ends with the
same metrics as an uninterrupted run (on CPU; on GPU up to the nondeterminism of the kernels). SIGINT (Ctrl-C) and
SIGTERM stop a run at the next step boundary with a checkpoint and print the command that resumes it
(:mod:`.interrupt`).

Model selection uses the validation split carved from the training set; the test set is evaluated at every
evaluation point as a reported curve only, and at the end for the final and the best-on-validation weights.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import bn_stats
from . import checkpoint as ckpt
from . import distributed as dist_utils
from . import preflight
from .interrupt import StopSignals, TrainingInterrupted
from .builders import (autocast_dtype, build_data, build_lambda_schedule, build_model, build_optimizer,
                       build_regularizer, build_scheduler, classification_loss, count_parameters, epoch_permutation,
                       mix_seed, orth_penalty, resolved_milestones, set_head_lambda, steps_per_epoch, total_steps)
from .config import TrainConfig
from .metrics import BN_DRIFT_FILE, METRICS_FILE, SUMMARY_FILE, write_bn_drift, write_metrics, write_summary

log = logging.getLogger("torchsphere.train")
CONFIG_FILE = "config.yaml"
DATA_FILE = "data.json"  # classes and input shape, for evaluate / predict
# config fields that may differ between a run and its resumption
RESUME_FREE = {"resume", "quiet", "output", "data_dir", "eval_batch_size", "device", "checkpoint_every", "threads"}


@dataclass
class RunState:
    """Mutable trainer state saved in ``checkpoint.pt`` (only weights_only-safe values)."""

    step: int = 0
    best_val_acc: float = -1.0
    best_step: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    drift_rows: list[dict[str, Any]] = field(default_factory=list)  # bn_drift.csv
    loss_sum: float = 0.0          # since the last evaluation
    correct: float = 0.0
    seen: float = 0.0
    wall_time: float = 0.0         # training seconds, evaluations excluded

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Run:
    """The objects of one run (plain container; the functions below do the work)."""

    config: TrainConfig
    model: nn.Module               # what is called: possibly DDP- and compile-wrapped
    raw_model: nn.Module           # the plain module: saved, evaluated
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    regularizer: Any
    lambda_schedule: Any
    head: nn.Module | None
    data: Any
    device: torch.device
    info: dist_utils.DistInfo
    out: Path
    total: int
    per_epoch: int
    augment: Any
    data_generator: torch.Generator
    state: RunState = field(default_factory=RunState)
    shadow: bn_stats.ShadowStats | None = None   # bn_shadow: statistics kept beside the model's own
    drift: bn_stats.MomentDrift | None = None    # bn_drift
    bn_hooks: bn_stats.MomentHooks | None = None  # feeds shadow and drift from the training batches
    train_eval_index: Tensor | None = None       # the fixed training images evaluated in eval mode

    @contextlib.contextmanager
    def precise_statistics(self) -> Any:
        """Inside: the model's BN statistics re-estimated on ``precise_bn`` training batches (no augmentation,
        batches drawn by a generator of (seed, step), so the training RNG is untouched); the running statistics
        that training keeps are restored on exit."""
        batches = bn_stats.precise_bn_batches(self.data.train_x, self.config.precise_bn, self.config.batch_size,
                                              mix_seed(self.config.seed, self.state.step, 2))
        with bn_stats.preserved_bn_state(self.raw_model), self.hooks_paused():
            bn_stats.precise_bn(self.raw_model, batches, device=self.device)
            yield

    @contextlib.contextmanager
    def hooks_paused(self) -> Any:
        with self.bn_hooks.paused() if self.bn_hooks is not None else contextlib.nullcontext():
            yield


def evaluate(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 500,
             amp: bool = False) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``model`` (eval mode, no labels to the head, no grad) on ``(x, y)``.

    The model's train/eval mode is restored afterwards. Returns (nan, nan) for an empty set.
    """
    if y.numel() == 0:
        return math.nan, math.nan
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct, loss_sum = 0, 0.0
    with torch.no_grad(), _autocast(device, amp):
        for start in range(0, y.numel(), batch_size):
            xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
            logits = model(xb).float()
            correct += int((logits.argmax(dim=1) == yb).sum())
            loss_sum += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
    model.train(was_training)
    return correct / y.numel(), loss_sum / y.numel()


def train_one_epoch(run: Run, epoch: int, progress: Any = None, stop: StopSignals | None = None) -> None:
    """Trains from the run's current step to the end of ``epoch`` (or of the budget), evaluating and checkpointing
    on the way. Resumes mid-epoch: the position in the epoch is ``step - epoch * steps_per_epoch``.

    Raises:
        TrainingInterrupted: ``stop`` saw SIGINT / SIGTERM; the checkpoint of the step just finished is written.
    """
    cfg, info, data = run.config, run.info, run.data
    order = epoch_permutation(data.train_y.numel(), cfg.seed, epoch)
    first = run.state.step - epoch * run.per_epoch
    run.model.train()
    for batch in range(first, run.per_epoch):
        if run.state.step >= run.total:
            return
        indices = dist_utils.shard_batch(order[batch * cfg.batch_size:(batch + 1) * cfg.batch_size], info)
        tick = time.perf_counter()
        loss, correct = train_step(run, data.train_x[indices], data.train_y[indices])
        run.state.step += 1
        # accumulate in float64 python numbers: exact and identical after a resume
        run.state.loss_sum += loss * indices.numel()
        run.state.correct += correct
        run.state.seen += indices.numel()
        run.state.wall_time += time.perf_counter() - tick
        if progress is not None:
            images_per_s = indices.numel() * info.world_size / max(time.perf_counter() - tick, 1e-9)
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.3f}", acc=f"{correct / indices.numel():.3f}",
                                 img_s=f"{images_per_s:.0f}", refresh=False)
        step = run.state.step
        if run.drift is not None and step % cfg.bn_drift == 0:
            run.state.drift_rows.extend(run.drift.close_window(step))
        if step % cfg.eval_every == 0 or step == run.total:
            evaluation_point(run, epoch, progress)
        elif cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            save_run_checkpoint(run, epoch)
        if stop is not None and _stop_requested(stop, run):
            save_run_checkpoint(run, epoch)
            raise TrainingInterrupted(stop.signum or 2, step, run.total, str(run.out))


def _stop_requested(stop: StopSignals, run: Run) -> bool:
    """True when a signal arrived on any rank (summed over the ranks under DDP, so that all stop together)."""
    if not run.info.enabled:
        return stop.requested
    flag = torch.tensor([1.0 if stop.requested else 0.0], device=run.device)
    total = dist_utils.all_reduce_sum(flag, run.info)
    if total.item() > 0 and stop.signum is None:
        stop.signum = 2  # another rank's SIGINT
    return total.item() > 0


def train_step(run: Run, x: Tensor, y: Tensor) -> tuple[float, float]:
    """One optimization step on a local batch; returns (loss, number correct)."""
    cfg = run.config
    x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
    if run.augment is not None:
        x = run.augment(x, run.data_generator)
    with _autocast(run.device, cfg.amp):
        logits = run.model(x, y)  # (N, K); the head applies its margin to the target class
    loss = classification_loss(cfg, logits, y)
    if cfg.orth > 0:
        loss = loss + cfg.orth * orth_penalty(run.raw_model)
    if run.regularizer is not None:
        loss = loss + run.regularizer()  # walks the model it was built on
    run.optimizer.zero_grad(set_to_none=True)
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        loss.backward()
        run.optimizer.step()
    run.scheduler.step()
    if run.regularizer is not None and hasattr(run.regularizer, "pole_step"):
        run.regularizer.pole_step()  # MHP/MHC: inner max step on the poles, own optimizer, detached weights
    if run.lambda_schedule is not None:
        set_head_lambda(run.head, run.lambda_schedule.step())
    correct = float((logits.detach().argmax(dim=1) == y).sum())
    return float(loss.detach()), correct


def evaluation_point(run: Run, epoch: int, progress: Any = None) -> None:
    """Evaluates (val for selection, test as a reported curve), appends a metrics row, checkpoints (rank 0).

    Columns beyond the base set: ``train_eval_acc`` (a fixed training subset in eval mode: a gap to ``train_acc``
    that the test set also shows is a BN-statistics gap, not overfitting), ``test_acc_<set>`` for every
    ``bn_shadow`` set, and with ``precise_bn`` the precise-statistics ``val_acc`` (then the selection metric) and
    ``test_acc_precise`` beside the running-statistics ``val_acc_running``.
    """
    cfg, st, data = run.config, run.state, run.data
    sums = dist_utils.all_reduce_sum(torch.tensor([st.loss_sum, st.correct, st.seen], dtype=torch.float64), run.info)
    model = run.raw_model

    def accuracy(x: Tensor, y: Tensor) -> float:
        return evaluate(model, x, y, batch_size=cfg.eval_batch_size, amp=cfg.amp)[0]

    val_acc = accuracy(data.val_x, data.val_y)
    test_acc = accuracy(data.test_x, data.test_y)
    row = dict(step=st.step, epoch=epoch, lr=run.optimizer.param_groups[0]["lr"],
               train_loss=float(sums[0] / sums[2]), train_acc=float(sums[1] / sums[2]), val_acc=val_acc,
               test_acc=test_acc, wall_time=round(st.wall_time, 3))
    if run.train_eval_index is not None:
        row["train_eval_acc"] = accuracy(data.train_x[run.train_eval_index], data.train_y[run.train_eval_index])
    if run.shadow is not None:
        for name in run.shadow.sets:
            with run.shadow.applied(name):
                row[f"test_acc_{name}"] = accuracy(data.test_x, data.test_y)
    st.loss_sum = st.correct = st.seen = 0.0
    with run.precise_statistics() if cfg.precise_bn else contextlib.nullcontext():
        if cfg.precise_bn:  # the saved and selected model carries the precise statistics
            row["val_acc_running"], row["val_acc"] = val_acc, accuracy(data.val_x, data.val_y)
            row["test_acc_precise"] = accuracy(data.test_x, data.test_y)
            val_acc = row["val_acc"]
        improved = not math.isnan(val_acc) and val_acc > st.best_val_acc
        if improved:
            st.best_val_acc, st.best_step = val_acc, st.step
            if run.info.is_main:
                ckpt.save_weights(model, run.out / ckpt.BEST_FILE, metadata={"step": str(st.step)})
    st.rows.append(row)
    if run.info.is_main:
        write_metrics(run.out / METRICS_FILE, st.rows)
        if run.drift is not None:
            write_bn_drift(run.out / BN_DRIFT_FILE, st.drift_rows)
        message = (f"step {st.step}/{run.total} epoch {epoch} lr {row['lr']:.3g} train_loss {row['train_loss']:.4f} "
                   f"train_acc {row['train_acc']:.4f} val_acc {val_acc:.4f} test_acc {test_acc:.4f}")
        if "test_acc_precise" in row:
            message += f" test_acc_precise {row['test_acc_precise']:.4f}"
        if progress is not None:
            progress.write(message)
        else:
            log.info(message)
    save_run_checkpoint(run, epoch)


def save_run_checkpoint(run: Run, epoch: int) -> None:
    """Rank 0 writes model.safetensors + checkpoint.pt atomically (with every rank's RNG states); all ranks wait."""
    rng = dist_utils.gather_objects(ckpt.rng_state(run.data_generator), run.info)  # one entry per rank
    if run.info.is_main:
        state = dict(run.state.to_dict(), epoch=epoch, optimizer=run.optimizer.state_dict(),
                     scheduler=run.scheduler.state_dict(), rng=rng)
        if run.scaler is not None:
            state["scaler"] = run.scaler.state_dict()
        if run.lambda_schedule is not None:
            state["lambda_schedule"] = run.lambda_schedule.state_dict()
        if run.regularizer is not None:
            state["regularizer"] = run.regularizer.state_dict()
            if getattr(run.regularizer, "pole_optimizer", None) is not None:
                state["pole_optimizer"] = run.regularizer.pole_optimizer.state_dict()
        if run.shadow is not None:
            state["bn_shadow"] = run.shadow.state_dict()
        if run.drift is not None:
            state["bn_drift"] = run.drift.state_dict()
        ckpt.save_checkpoint(run.out, run.raw_model, state)
    dist_utils.barrier(run.info)


def restore(run: Run) -> None:
    """Loads the run folder's checkpoint into ``run`` (every rank reads it)."""
    state = ckpt.load_checkpoint(run.out, run.raw_model, device=run.device)
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.scaler is not None and "scaler" in state:
        run.scaler.load_state_dict(state["scaler"])
    if run.lambda_schedule is not None:
        run.lambda_schedule.load_state_dict(state["lambda_schedule"])
        set_head_lambda(run.head, run.lambda_schedule.value)
    if run.regularizer is not None and "regularizer" in state:
        run.regularizer.load_state_dict(state["regularizer"])
        if "pole_optimizer" in state:
            run.regularizer.pole_optimizer.load_state_dict(state["pole_optimizer"])
    ckpt.set_rng_state(state["rng"][run.info.rank % len(state["rng"])], run.data_generator)
    if run.shadow is not None:
        run.shadow.load_state_dict(state["bn_shadow"])
    if run.drift is not None:
        run.drift.load_state_dict(state["bn_drift"])
    fields = RunState().to_dict().keys()
    run.state = RunState(**{k: state[k] for k in fields if k in state})
    if run.info.is_main:  # drop rows written after the checkpoint (a kill between the two writes)
        write_metrics(run.out / METRICS_FILE, run.state.rows)
        if run.drift is not None:
            write_bn_drift(run.out / BN_DRIFT_FILE, run.state.drift_rows)


def setup(config: TrainConfig) -> Run:
    """Builds every object of a run (data, model, optimizer, schedules, DDP) and restores it on ``resume``."""
    preflight.check_config(config)
    preflight.check_device(config)
    config = preflight.resolve_augment(config)  # config.yaml records the augmentation that runs
    out = Path(config.output)
    has_checkpoint = (out / ckpt.STATE_FILE).is_file()
    if has_checkpoint and not config.resume:
        raise FileExistsError(f"run folder {str(out)!r} already holds a checkpoint; pass --resume to continue it "
                              f"(`torchsphere train --output {out} --resume`) or choose another --output")
    if config.resume and not has_checkpoint:
        raise FileNotFoundError(f"--resume: run folder {str(out)!r} holds no checkpoint ({ckpt.STATE_FILE}); "
                                f"nothing to resume" + (" (the run stopped before its first checkpoint: start it "
                                                        "again without --resume)" if (out / CONFIG_FILE).is_file()
                                                        else ""))
    if has_checkpoint:
        check_resumable(config, out)
    info, device = dist_utils.init_distributed(config.device)
    seed_everything(mix_seed(config.seed, info.rank))
    data = build_data(config)
    if device.type == "cuda":  # small datasets live on the training device; batches are gathered there
        data = data.to(device)
    from ..data import make_augment

    augment = None if config.augment == "none" else make_augment(config.augment)
    torch.manual_seed(config.seed)  # same initial weights on every rank
    raw_model = build_model(config, data.num_classes, data.in_channels, data.image_size).to(device)
    for option in ("precise_bn", "bn_shadow", "bn_drift"):
        if getattr(config, option):
            bn_stats.require_bn(raw_model, option)
    if config.sync_bn and info.enabled:
        if device.type != "cuda":
            raise ValueError("sync_bn needs device 'cuda': torch's SyncBatchNorm only works with GPU modules; got "
                             f"device {config.device!r}")
        raw_model = nn.SyncBatchNorm.convert_sync_batchnorm(raw_model)
    if config.batch_size % info.world_size:
        raise ValueError(f"batch_size {config.batch_size} must be divisible by the world size {info.world_size}")
    per_epoch = steps_per_epoch(data.train_y.numel(), config.batch_size)
    total = total_steps(config, per_epoch)
    if info.is_main:
        for line in preflight.setup_warnings(config, total, info.enabled):
            log.warning("warning: %s", line)
    optimizer = build_optimizer(config, raw_model)
    scheduler = build_scheduler(config, optimizer, total)
    regularizer = build_regularizer(config, raw_model)
    if regularizer is not None:
        regularizer.to(device)
    lambda_schedule, head = build_lambda_schedule(config, raw_model)
    if lambda_schedule is not None:
        set_head_lambda(head, lambda_schedule.value)
    model = raw_model
    if config.compile:
        model = torch.compile(model)
    model = dist_utils.wrap_model(model, info, device)
    scaler = torch.amp.GradScaler("cuda") if config.amp and device.type == "cuda" else None
    data_generator = torch.Generator(device=device).manual_seed(mix_seed(config.seed, info.rank, 1))
    seed_everything(mix_seed(config.seed, info.rank))
    run = Run(config, model, raw_model, optimizer, scheduler, scaler, regularizer, lambda_schedule, head, data,
              device, info, out, total, per_epoch, augment, data_generator)
    if config.bn_shadow:
        run.shadow = bn_stats.ShadowStats(raw_model, config.bn_shadow)
    if config.bn_drift:
        run.drift = bn_stats.MomentDrift(raw_model)
    if run.shadow is not None or run.drift is not None:
        run.bn_hooks = bn_stats.MomentHooks(raw_model, [c for c in (run.shadow, run.drift) if c is not None])
    if config.train_eval_size and data.train_y.numel():
        generator = torch.Generator().manual_seed(mix_seed(config.seed, 3))
        run.train_eval_index = torch.randperm(data.train_y.numel(), generator=generator)[:config.train_eval_size]
    if has_checkpoint:
        restore(run)
    elif info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(out / CONFIG_FILE, config.to_yaml())
        ckpt.atomic_write_text(out / DATA_FILE, json.dumps(data_info(data), indent=2) + "\n")
    dist_utils.barrier(info)
    return run


def train(config: TrainConfig) -> dict[str, Any]:
    """Trains (or resumes) one run and returns its summary (also written to ``summary.json`` by rank 0)."""
    if config.sites is not None:  # training across sites: rounds of local epochs and averaging
        from .collaborative import train_sites

        return train_sites(config)
    with torch_threads(config.threads):
        return train_run(setup(config))


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Sets torch's CPU threads for the block (None: unchanged) and restores them."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_run(run: Run) -> dict[str, Any]:
    """Trains a :func:`setup` run to the end of its budget and returns its summary.

    SIGINT / SIGTERM stop it at the next step boundary with a checkpoint (:class:`TrainingInterrupted`).
    """
    try:
        if run.info.is_main:
            message = preflight.banner(run)
            (log.info if run.config.quiet else print)(message)
        progress = _progress(run)
        try:
            with StopSignals() as stop:
                while run.state.step < run.total:
                    train_one_epoch(run, run.state.step // run.per_epoch, progress, stop)
        finally:
            if progress is not None:
                progress.close()
        return finish(run)
    finally:
        dist_utils.cleanup(run.info)


def finish(run: Run) -> dict[str, Any]:
    """Final and best-on-validation test accuracy, ``summary.json``, ``model.safetensors`` of the final weights."""
    cfg, st, data = run.config, run.state, run.data
    final_running = None
    if cfg.precise_bn:  # the final model is saved with precise statistics
        final_running = evaluate(run.raw_model, data.test_x, data.test_y, batch_size=cfg.eval_batch_size,
                                 amp=cfg.amp)[0]
        batches = bn_stats.precise_bn_batches(data.train_x, cfg.precise_bn, cfg.batch_size,
                                              mix_seed(cfg.seed, st.step, 2))
        with run.hooks_paused():
            bn_stats.precise_bn(run.raw_model, batches, device=run.device)
    final_val, _ = evaluate(run.raw_model, data.val_x, data.val_y, batch_size=cfg.eval_batch_size, amp=cfg.amp)
    final_test, final_loss = evaluate(run.raw_model, data.test_x, data.test_y, batch_size=cfg.eval_batch_size,
                                      amp=cfg.amp)
    divergence = dist_utils.replica_divergence(run.raw_model, run.info)
    best_path = run.out / ckpt.BEST_FILE
    dist_utils.barrier(run.info)
    if best_path.is_file():
        best_model = ckpt.load_weights(copy.deepcopy(run.raw_model), best_path, device=run.device)
        best_test, _ = evaluate(best_model, data.test_x, data.test_y, batch_size=cfg.eval_batch_size, amp=cfg.amp)
        best = dict(step=st.best_step, val_acc=st.best_val_acc, test_acc=best_test)
    else:  # no validation split: the final model is the only candidate
        best = dict(step=st.step, val_acc=final_val, test_acc=final_test)
    summary = dict(
        run=str(run.out), model=cfg.model, operator=cfg.operator, head=cfg.head, norm=cfg.norm, dataset=cfg.dataset,
        dataset_source=getattr(data, "source", ""), seed=cfg.seed, steps=st.step, batch_size=cfg.batch_size,
        epochs=round(st.step / run.per_epoch, 3), world_size=run.info.world_size,
        replica_max_abs_diff=divergence,
        final=dict(step=st.step, val_acc=final_val, test_acc=final_test, test_loss=final_loss,
                   **({} if final_running is None else dict(test_acc_running=final_running))),
        bn=dict(stats=cfg.bn_stats, precise_bn=cfg.precise_bn, shadow=list(cfg.bn_shadow)),
        best=best, train_time_s=round(st.wall_time, 3),
        time_per_step_s=st.wall_time / max(st.step, 1), num_params=count_parameters(run.raw_model),
        milestones=resolved_milestones(cfg, run.total) if cfg.lr_schedule == "multistep" else [],
        data=data_info(data),
        selection="best = highest validation accuracy; test accuracy is never used for selection",
    )
    if run.info.is_main:
        ckpt.save_weights(run.raw_model, run.out / ckpt.MODEL_FILE, metadata={"step": str(st.step)})
        write_summary(run.out / SUMMARY_FILE, summary)
        message = (f"final: test_acc {final_test:.4f} (val {final_val:.4f}) | best-on-val @ step {best['step']}: "
                   f"test_acc {best['test_acc']:.4f} (val {best['val_acc']:.4f}) -> {run.out}")
        (log.info if cfg.quiet else print)(message)
    return summary


def data_info(data: Any) -> dict[str, Any]:
    """What evaluate / predict need to know about the data (``data.json``)."""
    return dict(dataset=data.name, source=getattr(data, "source", ""), num_classes=data.num_classes,
                classes=list(data.classes), in_channels=data.in_channels, image_size=list(data.image_size),
                train=int(data.train_y.numel()), val=int(data.val_y.numel()), test=int(data.test_y.numel()))


def check_resumable(config: TrainConfig, out: Path) -> None:
    """Refuses to resume a run with a configuration other than the one it was started with."""
    saved = TrainConfig.from_yaml(out / CONFIG_FILE).to_dict()
    diff = preflight.config_diff(config, saved, RESUME_FREE)
    if diff:
        raise ValueError(f"cannot resume {str(out)!r} with a different configuration ({', '.join(sorted(diff))}); "
                         f"only {', '.join(sorted(RESUME_FREE - {'resume'}))} may change")


def seed_everything(seed: int) -> None:
    """Seeds torch, python and numpy (when installed)."""
    torch.manual_seed(seed)
    random.seed(seed)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed % 2**32)


def _autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=autocast_dtype(device))


def _progress(run: Run):
    if run.config.quiet or not run.info.is_main:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=run.total, initial=run.state.step, desc=Path(run.config.output).name, unit="step",
                dynamic_ncols=True, leave=False, mininterval=0.5)
