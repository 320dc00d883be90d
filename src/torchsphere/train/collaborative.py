"""Training across sites: K sites, R rounds of E local epochs with a cyclical learning rate, averaged every round.

Collaborative deep learning across data centres (Xu, Mi, Feng et al., arXiv 1810.06877, 2018): each site keeps its
own data and trains its own copy of the model; only the models travel and are averaged. ``train(config)`` comes here
when ``config.sites`` is set::

    start: every site builds the same initial model (seeded); the training split is cut into K shards
           (torchsphere.data.shards: iid, label-shards or dirichlet; recorded with class histograms in sites.json)
    round r = 1..R:
        every site k: from the global model, E epochs over its own shard (batches of batch_size, the last partial
                      batch of an epoch dropped), lr following one cycle between lr_min and lr (lr_cycle)
        average:      parameters and BatchNorm buffers weighted by shard size n_k (avg_bn: average | recompute),
                      optimizer state averaged, reset or kept per site (avg_optimizer)
        evaluate:     the averaged model on the shared validation and test splits (rank 0); each site's own model on
                      the validation split before averaging (sites.csv)
        checkpoint:   rank 0 writes model.safetensors + checkpoint.pt atomically (the round is the unit of resume)

Processes: under ``torchrun --nproc_per_node=K`` every process is one site (gloo on CPU, NCCL on CUDA; no DDP, no
communication inside a local phase, one all-reduce per average); in a single process the K sites are simulated one
after another. Both give the same averaged model for the same seed (bit for bit for K = 2 on CPU).

Exact resume: a site's data order in its local epoch e of round r is ``epoch_permutation(n_k, seed, r * E + e)`` of
its shard, its augmentation generator state and optimizer state are saved at every round end, and the torch RNG of
a local phase is seeded by (seed, site, round). A run killed anywhere restarts its unfinished round from the last
round-end checkpoint and ends with the same metrics and weights as an uninterrupted run.

With one site (K = 1, any partition) the shard is the training split in order, so training equals plain training
with the same learning rates bit for bit (``lr_cycle: constant`` against ``lr_schedule: constant``).
"""
from __future__ import annotations

import copy
import csv
import io
import json
import logging
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import checkpoint as ckpt
from . import distributed as dist_utils
from . import loop
from .averaging import SiteReducer, average_models_, average_optimizers_, cycle_factor, recompute_bn_statistics_
from .builders import (build_data, build_lambda_schedule, build_model, build_optimizer, build_regularizer,
                       count_parameters, epoch_permutation, mix_seed, set_head_lambda)
from .config import TrainConfig
from .metrics import METRICS_FILE, SUMMARY_FILE, write_metrics, write_summary

log = logging.getLogger("torchsphere.train")
SITES_FILE = "sites.json"          # the partition: method, options, per-site sizes and class histograms
SITE_METRICS_FILE = "sites.csv"    # per round and site: local training loss / accuracy, local model's val accuracy
SITE_COLUMNS = ("round", "site", "samples", "steps", "train_loss", "train_acc", "val_acc")


class SitesError(ValueError):
    """A run across sites cannot start with this data or launch (too many sites, a too small shard, mismatched
    processes); the command line reports it with exit code 2."""


@dataclass
class Site:
    """One site of this process: its shard and the loop's per-run objects (model, optimizer, generator, ...)."""

    index: int
    shard: Tensor
    run: loop.Run

    @property
    def samples(self) -> int:
        return int(self.shard.numel())

    @property
    def steps_per_round(self) -> int:
        return self.run.config.local_epochs * (self.samples // self.run.config.batch_size)


def train_sites(config: TrainConfig) -> dict[str, Any]:
    """Trains (or resumes) a run across ``config.sites`` sites; returns the summary (also ``summary.json``)."""
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    info = dist_utils.DistInfo()
    try:
        info, device = dist_utils.init_distributed(config.device)
        sites, partition, state = _setup(config, info, device)
        return _train_rounds(config, info, sites, partition, state)
    finally:
        dist_utils.cleanup(info)
        torch.set_num_threads(threads)


def _setup(config: TrainConfig, info: dist_utils.DistInfo, device: torch.device):
    from ..data import make_augment
    from ..data.shards import partition_labels

    if info.enabled and info.world_size != config.sites:
        raise SitesError(f"under torchrun every process is one site: sites={config.sites} needs "
                         f"--nproc_per_node={config.sites} (or a single process, which simulates the sites); got "
                         f"WORLD_SIZE={info.world_size}")
    out = Path(config.output)
    has_checkpoint = (out / ckpt.STATE_FILE).is_file()
    if has_checkpoint and not config.resume:
        raise FileExistsError(f"run folder {str(out)!r} already holds a checkpoint; pass --resume to continue it "
                              f"or choose another --output")
    if has_checkpoint:
        loop.check_resumable(config, out)
    loop.seed_everything(mix_seed(config.seed, info.rank))
    data = build_data(config)
    _check_same_data(data, info)
    if device.type == "cuda":
        data = data.to(device)
    try:
        partition = partition_labels(data.train_y, config.sites, config.site_partition, seed=config.seed,
                                     num_classes=data.num_classes, shards_per_site=config.shards_per_site,
                                     alpha=config.dirichlet_alpha, min_size=config.batch_size)
    except ValueError as exc:
        raise SitesError(f"{exc} [training split of {data.train_y.numel()} examples, batch_size "
                         f"{config.batch_size} per site]") from exc
    augment_name = config.augment if config.augment is not None else data.augment
    augment = None if augment_name == "none" else make_augment(augment_name)
    torch.manual_seed(config.seed)  # the same initial weights at every site
    initial = build_model(config, data.num_classes, data.in_channels, data.image_size).to(device)
    local = range(config.sites) if not info.enabled else [info.rank]
    sites = [_make_site(config, k, partition.shards[k].to(device), copy.deepcopy(initial), data, device, info, out,
                        augment) for k in local]
    state: dict[str, Any] = dict(round=0, step=0, rows=[], site_rows=[], best_val_acc=-1.0, best_step=0,
                                 wall_time=0.0)
    if has_checkpoint:
        state = _restore(sites, out, device)
    elif info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(out / loop.CONFIG_FILE, config.to_yaml())
        ckpt.atomic_write_text(out / loop.DATA_FILE, json.dumps(loop.data_info(data), indent=2) + "\n")
        record = dict(partition.describe(), weights="shard size (n_k / sum n)", batch_size=config.batch_size,
                      steps_per_round=[config.local_epochs * (n // config.batch_size) for n in partition.sizes])
        ckpt.atomic_write_text(out / SITES_FILE, json.dumps(record, indent=2) + "\n")
    dist_utils.barrier(info)
    return sites, partition, state


def _make_site(config: TrainConfig, k: int, shard: Tensor, model: nn.Module, data: Any, device: torch.device,
               info: dist_utils.DistInfo, out: Path, augment: Any) -> Site:
    optimizer = build_optimizer(config, model)
    regularizer = build_regularizer(config, model)
    if regularizer is not None:
        regularizer.to(device)
    lambda_schedule, head = build_lambda_schedule(config, model)
    if lambda_schedule is not None:
        set_head_lambda(head, lambda_schedule.value)
    scaler = torch.amp.GradScaler("cuda") if config.amp and device.type == "cuda" else None
    generator = torch.Generator(device=device).manual_seed(mix_seed(config.seed, k, 1))
    scheduler = _round_scheduler(config, optimizer, 1)
    run = loop.Run(config, model, model, optimizer, scheduler, scaler, regularizer, lambda_schedule, head, data,
                   device, info, out, 0, 0, augment, generator)
    return Site(k, shard, run)


def _round_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, steps: int):
    """A fresh LambdaLR for one round: lr(s) = lr * cycle_factor(s) for the round's steps s = 0, 1, ..."""
    low = (config.lr_min if config.lr_min is not None else config.lr / 10) / config.lr
    for group in optimizer.param_groups:  # the cycle's top is always lr, whatever a loaded state said
        group["initial_lr"] = group["lr"] = config.lr
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(cycle_factor, steps_per_round=steps, shape=config.lr_cycle, low=low), last_epoch=-1)


def _local_phase(site: Site, round_index: int) -> dict[str, Any]:
    """E local epochs of one site from the current global model; returns its sums for the metrics."""
    run, cfg = site.run, site.run.config
    if cfg.avg_optimizer == "reset":
        run.optimizer = build_optimizer(cfg, run.model)
    steps = site.steps_per_round
    run.scheduler = _round_scheduler(cfg, run.optimizer, steps)
    per_epoch, batch = site.samples // cfg.batch_size, cfg.batch_size
    loss_sum = correct = seen = 0.0
    tick = time.perf_counter()
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        torch.manual_seed(mix_seed(cfg.seed, site.index, round_index, 3))
        run.model.train()
        for e in range(cfg.local_epochs):
            order = site.shard[epoch_permutation(site.samples, cfg.seed, round_index * cfg.local_epochs + e)
                               .to(site.shard.device)]
            for b in range(per_epoch):
                indices = order[b * batch:(b + 1) * batch]
                loss, hits = loop.train_step(run, run.data.train_x[indices], run.data.train_y[indices])
                loss_sum += loss * batch
                correct += hits
                seen += batch
    return dict(site=site.index, samples=site.samples, steps=steps, loss_sum=loss_sum, correct=correct, seen=seen,
                lr=run.optimizer.param_groups[0]["lr"], seconds=time.perf_counter() - tick)


def _train_rounds(config: TrainConfig, info: dist_utils.DistInfo, sites: list[Site], partition: Any,
                  state: dict[str, Any]) -> dict[str, Any]:
    reducer = SiteReducer(info)
    data, cfg = sites[0].run.data, config
    weights = [float(s.samples) for s in sites]
    for r in range(state["round"], cfg.rounds):
        results = [_local_phase(site, r) for site in sites]
        for site, result in zip(sites, results):  # each site's own model, before averaging
            result["val_acc"] = loop.evaluate(site.run.model, data.val_x, data.val_y,
                                              batch_size=cfg.eval_batch_size, amp=cfg.amp)[0]
        average_models_([s.run.model for s in sites], weights, reducer)
        if cfg.avg_optimizer == "average":
            average_optimizers_([s.run.optimizer for s in sites], weights, reducer)
        if cfg.avg_bn == "recompute":
            recompute_bn_statistics_([s.run.model for s in sites], [_bn_batches(s) for s in sites], reducer)
        results = [x for part in dist_utils.gather_objects(results, info) for x in part]  # every site, in order
        state["wall_time"] += max(x["seconds"] for x in results) if info.enabled else \
            sum(x["seconds"] for x in results)
        _end_round(cfg, info, sites, state, results, r)
    return _finish(cfg, info, sites, partition, state)


def _bn_batches(site: Site):
    """The site's shard in order, in batches of batch_size (the remainder dropped), for BatchNorm recomputation."""
    x, batch = site.run.data.train_x, site.run.config.batch_size
    for start in range(0, site.samples - batch + 1, batch):
        yield x[site.shard[start:start + batch]].to(site.run.device)


def _end_round(cfg: TrainConfig, info: dist_utils.DistInfo, sites: list[Site], state: dict[str, Any],
               results: list[dict[str, Any]], r: int) -> None:
    data, model = sites[0].run.data, sites[0].run.model
    scores = None
    if info.is_main:  # one evaluation of the (identical) averaged model; the other ranks wait for its result
        scores = [loop.evaluate(model, x, y, batch_size=cfg.eval_batch_size, amp=cfg.amp)[0]
                  for x, y in ((data.val_x, data.val_y), (data.test_x, data.test_y))]
    val_acc, test_acc = dist_utils.broadcast_object(scores, info)
    seen = sum(x["seen"] for x in results)
    state["step"] += sum(x["steps"] for x in results)
    row = dict(step=state["step"], epoch=(r + 1) * cfg.local_epochs - 1, lr=results[0]["lr"],  # 0-based, as loop
               train_loss=sum(x["loss_sum"] for x in results) / seen,
               train_acc=sum(x["correct"] for x in results) / seen,
               val_acc=val_acc, test_acc=test_acc, wall_time=round(state["wall_time"], 3))
    state["rows"].append(row)
    state["site_rows"].extend(dict(round=r + 1, site=x["site"], samples=x["samples"], steps=x["steps"],
                                   train_loss=x["loss_sum"] / x["seen"], train_acc=x["correct"] / x["seen"],
                                   val_acc=x["val_acc"]) for x in results)
    state["round"] = r + 1
    improved = not math.isnan(val_acc) and val_acc > state["best_val_acc"]
    if improved:
        state["best_val_acc"], state["best_step"] = val_acc, state["step"]
    _save(cfg, info, sites, state, improved)
    if info.is_main:
        local = ", ".join(f"{x['val_acc']:.4f}" for x in results)
        message = (f"round {r + 1}/{cfg.rounds} step {state['step']} train_loss {row['train_loss']:.4f} "
                   f"train_acc {row['train_acc']:.4f} val_acc {val_acc:.4f} test_acc {test_acc:.4f} "
                   f"(site models' val_acc before averaging: {local})")
        (log.info if cfg.quiet else print)(message)


def _site_state(site: Site) -> dict[str, Any]:
    run = site.run
    out: dict[str, Any] = dict(site=site.index, generator=run.data_generator.get_state())
    if run.config.avg_optimizer != "reset":
        out["optimizer"] = run.optimizer.state_dict()
    if run.regularizer is not None:  # MHP/MHC poles stay local to each site
        out["regularizer"] = run.regularizer.state_dict()
        if getattr(run.regularizer, "pole_optimizer", None) is not None:
            out["pole_optimizer"] = run.regularizer.pole_optimizer.state_dict()
    if run.lambda_schedule is not None:
        out["lambda_schedule"] = run.lambda_schedule.state_dict()
    if run.scaler is not None:
        out["scaler"] = run.scaler.state_dict()
    return out


def _save(cfg: TrainConfig, info: dist_utils.DistInfo, sites: list[Site], state: dict[str, Any],
          improved: bool) -> None:
    """Rank 0 writes metrics.csv, sites.csv, best.safetensors and the round-end checkpoint atomically."""
    site_states = [x for part in dist_utils.gather_objects([_site_state(s) for s in sites], info) for x in part]
    if info.is_main:
        out, model = Path(cfg.output), sites[0].run.model
        if improved:
            ckpt.save_weights(model, out / ckpt.BEST_FILE, metadata={"step": str(state["step"])})
        write_metrics(out / METRICS_FILE, state["rows"])
        write_site_metrics(out / SITE_METRICS_FILE, state["site_rows"])
        ckpt.save_checkpoint(out, model, dict(state, sites=site_states))
    dist_utils.barrier(info)


def _restore(sites: list[Site], out: Path, device: torch.device) -> dict[str, Any]:
    saved = ckpt.load_checkpoint(out, device=device)
    by_site = {s["site"]: s for s in saved["sites"]}
    for site in sites:
        run, own = site.run, by_site[site.index]
        run.model.load_state_dict(saved["model"])
        run.data_generator.set_state(own["generator"])
        if "optimizer" in own:
            run.optimizer.load_state_dict(own["optimizer"])
        if run.regularizer is not None and "regularizer" in own:
            run.regularizer.load_state_dict(own["regularizer"])
            if "pole_optimizer" in own:
                run.regularizer.pole_optimizer.load_state_dict(own["pole_optimizer"])
        if run.lambda_schedule is not None:
            run.lambda_schedule.load_state_dict(own["lambda_schedule"])
            set_head_lambda(run.head, run.lambda_schedule.value)
        if run.scaler is not None and "scaler" in own:
            run.scaler.load_state_dict(own["scaler"])
    state = {k: saved[k] for k in ("round", "step", "rows", "site_rows", "best_val_acc", "best_step", "wall_time")}
    if sites[0].run.info.is_main:  # drop rows written after the checkpoint (a kill between the two writes)
        write_metrics(out / METRICS_FILE, state["rows"])
        write_site_metrics(out / SITE_METRICS_FILE, state["site_rows"])
    return state


def _finish(cfg: TrainConfig, info: dist_utils.DistInfo, sites: list[Site], partition: Any,
            state: dict[str, Any]) -> dict[str, Any]:
    run, data = sites[0].run, sites[0].run.data
    model, out = run.model, Path(cfg.output)
    final_val, final_test, final_loss = math.nan, math.nan, math.nan
    if info.is_main:
        final_val, _ = loop.evaluate(model, data.val_x, data.val_y, batch_size=cfg.eval_batch_size, amp=cfg.amp)
        final_test, final_loss = loop.evaluate(model, data.test_x, data.test_y, batch_size=cfg.eval_batch_size,
                                               amp=cfg.amp)
    final_val, final_test, final_loss = dist_utils.broadcast_object((final_val, final_test, final_loss), info)
    divergence = max(dist_utils.replica_divergence(model, info), _local_divergence(sites))
    best = dict(step=state["step"], val_acc=final_val, test_acc=final_test)
    if (out / ckpt.BEST_FILE).is_file() and info.is_main:
        best_model = ckpt.load_weights(copy.deepcopy(model), out / ckpt.BEST_FILE, device=run.device)
        best_test, _ = loop.evaluate(best_model, data.test_x, data.test_y, batch_size=cfg.eval_batch_size,
                                     amp=cfg.amp)
        best = dict(step=state["best_step"], val_acc=state["best_val_acc"], test_acc=best_test)
    best = dist_utils.broadcast_object(best, info)
    summary = dict(
        run=str(out), model=cfg.model, operator=cfg.operator, head=cfg.head, norm=cfg.norm, dataset=cfg.dataset,
        dataset_source=getattr(data, "source", ""), seed=cfg.seed, steps=state["step"], batch_size=cfg.batch_size,
        epochs=state["round"] * cfg.local_epochs, world_size=info.world_size, replica_max_abs_diff=divergence,
        final=dict(step=state["step"], val_acc=final_val, test_acc=final_test, test_loss=final_loss),
        best=best, train_time_s=round(state["wall_time"], 3),
        time_per_step_s=state["wall_time"] / max(state["step"], 1), num_params=count_parameters(model),
        milestones=[], data=loop.data_info(data),
        sites=dict(sites=cfg.sites, rounds=cfg.rounds, local_epochs=cfg.local_epochs, processes=info.world_size,
                   partition=partition.describe(), lr_cycle=cfg.lr_cycle, lr=cfg.lr,
                   lr_min=cfg.lr_min if cfg.lr_min is not None else cfg.lr / 10, avg_bn=cfg.avg_bn,
                   avg_optimizer=cfg.avg_optimizer, weights="shard size",
                   examples_seen=state["step"] * cfg.batch_size),
        selection="best = highest validation accuracy of the averaged model after a round; test accuracy is never "
                  "used for selection",
    )
    if info.is_main:
        ckpt.save_weights(model, out / ckpt.MODEL_FILE, metadata={"step": str(state["step"])})
        write_summary(out / SUMMARY_FILE, summary)
        message = (f"final ({cfg.sites} sites, {state['round']} rounds): test_acc {final_test:.4f} (val "
                   f"{final_val:.4f}) | best-on-val @ step {best['step']}: test_acc {best['test_acc']:.4f} -> {out}")
        (log.info if cfg.quiet else print)(message)
    return summary


def _local_divergence(sites: list[Site]) -> float:
    """Largest absolute difference between the simulated sites' models after averaging (0.0 when identical)."""
    worst = 0.0
    for other in sites[1:]:
        for a, b in zip(sites[0].run.model.parameters(), other.run.model.parameters()):
            worst = max(worst, float((a.detach() - b.detach()).abs().max()))
    return worst


def _check_same_data(data: Any, info: dist_utils.DistInfo) -> None:
    """Every process must hold the same dataset (it partitions it identically); a mismatch names what differs."""
    labels = data.train_y.long()
    mine = dict(classes=int(data.num_classes), train=int(labels.numel()), label_sum=int(labels.sum()),
                shape=[int(data.in_channels), *map(int, data.image_size)])
    everyone = dist_utils.gather_objects(mine, info)
    for rank, theirs in enumerate(everyone):
        if theirs != everyone[0]:
            diff = ", ".join(f"{k}: {everyone[0][k]} vs {theirs[k]}" for k in mine if theirs[k] != everyone[0][k])
            raise SitesError(f"the sites' processes loaded different training data (rank 0 vs rank {rank}: {diff}); "
                             f"the class count and the split must match on every site")


def write_site_metrics(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """``sites.csv``: one row per round and site, written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(SITE_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
    ckpt.atomic_write_text(path, buffer.getvalue())


def read_site_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Reads ``sites.csv`` back (ints for round, site, samples, steps; floats elsewhere)."""
    with Path(path).open(newline="") as f:
        return [{k: int(v) if k in ("round", "site", "samples", "steps") else float(v) for k, v in raw.items()}
                for raw in csv.DictReader(f)]
