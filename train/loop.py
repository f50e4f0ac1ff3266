"""The training loop: selector plan -> batches -> weighted per-sample loss -> SGD -> observe -> evaluate.

Reads top to bottom like nanoGPT's train.py, but as functions. Per epoch::

    plan = selector.plan(epoch)                      # indices (shuffled), weights, aug codes
    for batch in train.plan_batches(plan, ...):      # base/strong augmentation per sample
        per_sample = cross_entropy(model(x), y, reduction="none")
        loss = weighted_mean(per_sample, batch weights); SGD step at lr_at(samples consumed)
    selector.observe(plan.indices, per_sample losses of the epoch)
    evaluate on the test split; write epochs/ and history/ parquet; checkpoint

The LR is a pure function of the samples consumed so far over the run's budget in sample-steps
(fixed before epoch 1), so changing epoch sizes never disturb the schedule. Files are written
atomically; ``resume=RUN_ID`` continues from the last checkpoint and repeats an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import datetime
import io
import logging
import math
import secrets
import time
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from dds import catalog
from dds.device import resolve_device
from dds.distributed import (Dist, all_sum, broadcast_object, check_same, device_for, gather_part, part_positions,
                             part_size, sync_buffers)
from dds.distributed import init as dist_init
from dds.errors import DdsError
from dds.train.augment import AUG_NAMES, Augmenter, channel_stats, normalize
from dds.train.config import TrainConfig
from dds.train.data import load_sample_info, open_split
from dds.train.models import create_model
from dds.workspace import Workspace, atomic_write_bytes, atomic_write_json, write_parquet

log = logging.getLogger(__name__)

TIMERS = ("data_s", "compute_s", "select_s", "eval_s", "wall_s")


def lr_at(samples_done: int, total_sample_steps: int, *, lr: float, schedule: str = "cosine",
          warmup: float = 0.0) -> float:
    """The learning rate after ``samples_done`` of the run's ``total_sample_steps`` samples.

    Args:
        samples_done: samples consumed by optimiser steps so far (>= 0).
        total_sample_steps: the run's budget in sample-steps (> 0); progress past it is held at 1.
        lr: the peak learning rate.
        schedule: "cosine" (from ``lr`` down to 0 at the end) or "constant".
        warmup: fraction of the run with a linear warm-up from 0 to ``lr``, in [0, 1).
    """
    progress = min(samples_done / total_sample_steps, 1.0)
    if progress < warmup:
        return lr * progress / warmup
    if schedule == "constant":
        return lr
    return lr * 0.5 * (1.0 + math.cos(math.pi * (progress - warmup) / (1.0 - warmup)))


def new_run_id(dataset: str, policy: str) -> str:
    """``{dataset}-{policy}-{YYYYmmdd-HHMMSS}-{4 hex}``."""
    return f"{dataset}-{policy}-{datetime.datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def history_columns(n: int, indices: np.ndarray, weights: np.ndarray, aug: np.ndarray,
                    losses: np.ndarray) -> dict[str, pa.Array]:
    """One row per train sample for one epoch: selected, count, weight, aug, loss (null if unselected).

    Args:
        n: number of train samples N.
        indices, weights, aug, losses: ``(M,)`` plan indices (int64), weights (float32), aug codes
            (uint8) and unweighted per-sample losses (float32) of the epoch.

    Returns:
        Columns of length N in ``samples.idx`` order; a sample planned twice gets its mean weight
        and loss, and aug "strong" when any of its steps was strong.
    """
    count = np.bincount(indices, minlength=n)
    selected = count > 0
    denom = np.maximum(count, 1)
    weight = np.bincount(indices, weights=weights, minlength=n) / denom
    loss = np.bincount(indices, weights=losses, minlength=n) / denom
    strong = np.bincount(indices, weights=(aug == 1), minlength=n) > 0
    aug_name = np.where(strong, AUG_NAMES[1], AUG_NAMES[0]).astype(object)
    aug_name[~selected] = None
    return {"selected": pa.array(selected), "count": pa.array(count.astype(np.int32)),
            "weight": pa.array(weight.astype(np.float32), mask=~selected),
            "aug": pa.array(aug_name, type=pa.string()),
            "loss": pa.array(loss.astype(np.float32), mask=~selected)}


@torch.inference_mode()
def evaluate(model: torch.nn.Module, split, *, device: torch.device, batch_size: int, amp: bool,
             dist_: Dist = Dist()) -> float:
    """Top-1 accuracy of ``model`` on every sample of ``split`` (no augmentation).

    In a distributed job each rank scores every ``world``-th batch and the counts are summed.
    """
    model.eval()
    mean, std = channel_stats(split.mean, split.std, device)
    correct = torch.zeros((), dtype=torch.int64, device=device)  # summed on device: one sync at the end
    for i, batch in enumerate(split.eval_batches(batch_size)):
        if i % dist_.world != dist_.rank:
            continue
        x = normalize(batch["image"].to(device, non_blocking=True), mean, std)
        with _autocast(device, amp):
            logits = model(x)
        correct += (logits.argmax(1) == batch["label"].to(device, non_blocking=True)).sum()
    return all_sum(dist_, correct).item() / split.n


def _autocast(device: torch.device, amp: bool):
    if device.type == "cuda" and amp:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _train_epoch(model, opt, train, plan, *, cfg: TrainConfig, device: torch.device, augmenter: Augmenter,
                 samples_done: int, total: int, progress: bool,
                 dist_: Dist = Dist()) -> tuple[torch.Tensor, dict[str, float]]:
    """Train one epoch on ``plan``; returns the (P,) per-sample losses of this rank's part (on device;
    P = M in a single process) and its timings. A distributed rank trains its part
    (:func:`dds.distributed.part_positions`) in batches of ``batch_size / world``."""
    from tqdm import tqdm

    from dds.selector.torch import weighted_mean

    model.train()
    positions = part_positions(len(plan.indices), dist_.rank, dist_.world) if dist_.enabled else None
    m = len(plan.indices) if positions is None else len(positions)
    losses = torch.empty(m, dtype=torch.float32, device=device)  # kept on device: copied once per epoch
    mean, std = channel_stats(train.mean, train.std, device)  # once per epoch, not per batch
    timing = {"data_s": 0.0, "compute_s": 0.0}
    bar = tqdm(total=m, desc=f"epoch {plan.epoch + 1}/{cfg.epochs}", unit="img", disable=not progress)
    batches = iter(train.plan_batches(plan, seed=cfg.seed, augmenter=augmenter,
                                      batch_size=cfg.batch_size // dist_.world, positions=positions))
    done = 0
    while True:
        t0 = time.perf_counter()
        batch = next(batches, None)  # batch assembly + augmentation (CPU)
        if batch is None:
            break
        b = len(batch["label"])
        x = batch["image"].to(device, non_blocking=True)  # uint8 over the bus, normalised on device
        y = batch["label"].to(device, non_blocking=True)
        w = batch["weight"].to(device, non_blocking=True)
        t1 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(samples_done + done * dist_.world, total, lr=cfg.lr, schedule=cfg.schedule,
                                warmup=cfg.warmup)
        with _autocast(device, cfg.amp):
            logits = model(normalize(x, mean, std))
        per_sample = F.cross_entropy(logits.float(), y, reduction="none", label_smoothing=cfg.label_smoothing)
        loss = weighted_mean(per_sample, w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses[done:done + b] = per_sample.detach()  # device copy, no sync
        done += b
        timing["data_s"] += t1 - t0
        timing["compute_s"] += time.perf_counter() - t1
        bar.update(b)  # the bar's rate is the training throughput in img/s
    if device.type == "cuda":
        t1 = time.perf_counter()
        torch.cuda.synchronize()  # one sync per epoch, so compute_s includes the queued GPU work
        timing["compute_s"] += time.perf_counter() - t1
    bar.close()
    return losses, timing


def _checkpoint_bytes(**state: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _load_checkpoint(ws: Workspace, run_id: str) -> dict[str, Any]:
    path = ws.run_dir(run_id) / "checkpoint.pt"
    if not path.exists():
        raise DdsError(f"run '{run_id}' has no checkpoint at {path}; list runs with: "
                       "dds sql \"SELECT run_id, status FROM runs\"")
    # weights_only=False: our own file, holding the selector's numpy state next to the tensors
    return torch.load(path, map_location="cpu", weights_only=False)


def _write_run(ws: Workspace, run_id: str, cfg: TrainConfig, status: str, totals: dict[str, Any]) -> None:
    row = {"run_id": run_id, "dataset": cfg.dataset, "policy": cfg.policy, "budget": float(cfg.budget),
           "epochs": cfg.epochs, "seed": cfg.seed, "status": status, "config": cfg.to_json(), "model": cfg.model,
           **totals, "updated": datetime.datetime.now().isoformat(timespec="seconds")}
    schema = {"epochs": pa.int32(), "seed": pa.int32(), "epochs_done": pa.int32(), "test_acc": pa.float64()}
    atomic_write_json(ws.run_dir(run_id) / "run.json", row)
    write_parquet(ws.run_dir(run_id) / "run.parquet",
                  pa.table({k: pa.array([v], type=schema.get(k)) for k, v in row.items()}))


def _write_epoch(ws: Workspace, run_id: str, epoch: int, row: dict[str, Any], keys: np.ndarray,
                 hist: dict[str, pa.Array]) -> None:
    run_dir = ws.run_dir(run_id)
    types = {"epoch": pa.int32(), "selected": pa.int64(), "sample_steps": pa.int64(), "test_acc": pa.float64()}
    write_parquet(run_dir / "epochs" / f"{epoch:04d}.parquet",
                  pa.table({"run_id": [run_id], "epoch": pa.array([epoch], pa.int32()),
                            **{k: pa.array([v], type=types.get(k)) for k, v in row.items()}}))
    n = len(keys)
    write_parquet(run_dir / "history" / f"{epoch:04d}.parquet",
                  pa.table({"run_id": pa.array([run_id] * n), "epoch": pa.array(np.full(n, epoch, np.int32)),
                            "key": pa.array(keys), **hist}))


def _drop_later_epochs(ws: Workspace, run_id: str, last_done: int) -> None:
    """Remove epoch/history files written after the checkpoint (they are redone on resume)."""
    for sub in ("epochs", "history"):
        for path in (ws.run_dir(run_id) / sub).glob("*.parquet"):
            if int(path.stem) > last_done:
                path.unlink()


def run_train(ws: Workspace, cfg: TrainConfig | None = None, *, resume: str | None = None, progress: bool = True,
              stop_after: int | None = None, data: tuple | None = None) -> dict[str, Any]:
    """Train one run; writes runs/{run_id}/run.parquet, epochs/, history/ and checkpoint.pt.

    Args:
        ws: the workspace.
        cfg: the run's config (ignored with ``resume``, whose saved config is used; a different
            dataset raises).
        resume: run id to continue from its last checkpoint.
        progress: show a tqdm bar per epoch.
        stop_after: stop after this many epochs in total (status "stopped", resumable); for tests.
        data: ``(train, eval)`` splits from :func:`dds.train.data.open_split` to reuse (``dds bench``).

    Returns:
        run_id, status, test_acc (last evaluation), budget_spent (fraction of epochs * N),
        sample_steps, total_sample_steps, epochs_done and the summed timers data_s, compute_s,
        select_s, eval_s, wall_s, train_s (= data_s + compute_s + select_s).

    Raises:
        DdsError: bad config, unknown policy/model, missing dataset or test split, missing checkpoint.
    """
    ckpt = None
    if resume is not None:
        ckpt = _load_checkpoint(ws, resume)
        saved = TrainConfig.from_json(ckpt["config"])
        if cfg is not None and cfg.dataset != saved.dataset:
            raise DdsError(f"run '{resume}' trained on dataset {saved.dataset}, not {cfg.dataset}")
        cfg = saved
    if cfg is None:
        raise DdsError("run_train needs a TrainConfig or a run id to resume")
    cfg.validate()
    d = dist_init(cfg.device)
    if cfg.batch_size % d.world:
        raise DdsError(f"batch_size {cfg.batch_size} is the global batch and must split evenly over the {d.world} "
                       f"processes; use a multiple of {d.world}")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = device_for(d, resolve_device(cfg.device))
    sel, model, opt, train, test = _setup(ws, cfg, device, data)
    cfg.budget = sel.budget  # a policy that ignores the budget (full) records the one it spends
    total = sel.total_sample_steps
    if total < 1:
        raise DdsError(f"budget {cfg.budget} of {cfg.epochs} epochs x {train.n} samples rounds to 0 sample-steps; "
                       "raise --budget or --epochs")
    totals: dict[str, Any] = {"budget_spent": 0.0, "sample_steps": 0, "total_sample_steps": int(total),
                              "total_steps": math.ceil(total / cfg.batch_size), "epochs_done": 0,
                              "test_acc": None, **{t: 0.0 for t in TIMERS}}
    start_epoch, run_id = 0, broadcast_object(d, resume or new_run_id(cfg.dataset, cfg.policy))
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])  # moves the momentum buffers to the parameters' device
        sel.load_state_dict(ckpt["selector"])
        torch.set_rng_state(ckpt["torch_rng"])
        totals.update(ckpt["totals"])
        start_epoch = ckpt["epoch"] + 1
        if d.is_main:
            _drop_later_epochs(ws, run_id, ckpt["epoch"])
        log.info("resuming %s at epoch %d", run_id, start_epoch)
    log.info("run %s: %s on %s, %d train / %d %s samples, budget %d sample-steps, device %s",
             run_id, cfg.policy, cfg.dataset, train.n, test.n, cfg.eval_split, total, device)
    net = model
    if d.enabled:  # gradients averaged over the ranks; the checkpoint keeps the bare model's state
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    out = _Writer(ws, run_id, cfg, main=d.is_main)
    out.run("running", totals)
    try:
        status = _epochs(out, cfg, sel, model, net, opt, train, test, device, totals, d,
                         start_epoch=start_epoch, stop_after=stop_after, progress=progress and d.is_main)
    except BaseException:
        out.run("failed", totals)
        raise
    out.run(status, totals)
    return {"run_id": run_id, "status": status, **totals,
            "train_s": totals["data_s"] + totals["compute_s"] + totals["select_s"]}


def _setup(ws: Workspace, cfg: TrainConfig, device: torch.device, data: tuple | None) -> tuple:
    """Selector, model (on ``device``), SGD optimiser, train and evaluation splits of a run.

    The selector and the model come first: they are cheap and reject unknown names before any
    decoding; then the evaluation split (``cfg.eval_split``; its absence is an error), then train.
    """
    from dds.selector import Selector, get_policy

    info = ws.dataset_info(cfg.dataset)
    need_scores = get_policy(cfg.policy).needs_scores
    sample_info = load_sample_info(ws, cfg.dataset, cfg.encoder, need_scores=need_scores)
    if need_scores and not sample_info.has_scores:
        raise DdsError(f"policy {cfg.policy} needs the scores of {cfg.dataset} under encoder {cfg.encoder}: run "
                       f"`dds embed {cfg.dataset} --encoder {cfg.encoder}` and `dds index {cfg.dataset} "
                       f"--encoder {cfg.encoder}` first")
    sel = Selector(cfg.policy, sample_info,
                   epochs=cfg.epochs,
                   budget=cfg.budget, seed=cfg.seed, **cfg.policy_options)
    with torch.random.fork_rng(devices=[]):  # model init from the run's seed, global RNG left untouched
        torch.manual_seed(cfg.seed)
        model = create_model(cfg.model, len(info["classes"]), int(info["channels"]), int(info["image_size"]))
    model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                          weight_decay=cfg.weight_decay)
    if data is None:
        test = open_split(ws, cfg.dataset, cfg.eval_split, cache=cfg.cache)
        train = open_split(ws, cfg.dataset, "train", cache=cfg.cache)
    else:
        train, test = data
    return sel, model, opt, train, test


class _Writer:
    """The run's row in ``runs``; in a distributed job only rank 0 writes (the others' calls do nothing)."""

    def __init__(self, ws: Workspace, run_id: str, cfg: TrainConfig, *, main: bool) -> None:
        self.ws, self.run_id, self.cfg, self.main = ws, run_id, cfg, main

    def run(self, status: str, totals: dict[str, Any]) -> None:
        if self.main:
            _write_run(self.ws, self.run_id, self.cfg, status, totals)
            catalog.refresh(self.ws)


def _epochs(out: _Writer, cfg, sel, model, net, opt, train, test, device, totals, d: Dist, *,
            start_epoch: int, stop_after: int | None, progress: bool) -> str:
    """The epoch loop of :func:`run_train`; updates ``totals`` in place and returns the final status.

    ``net`` is ``model`` or its DistributedDataParallel wrapper (trained through; ``model`` is saved).
    """
    augmenter = Augmenter(train.image_size)
    for epoch in range(start_epoch, cfg.epochs):
        t_start = time.perf_counter()
        plan = sel.plan(epoch)
        check_same(d, plan, device)
        select_s = time.perf_counter() - t_start
        losses, timing = _train_epoch(net, opt, train, plan, cfg=cfg, device=device, augmenter=augmenter,
                                      samples_done=totals["sample_steps"], total=totals["total_sample_steps"],
                                      progress=progress, dist_=d)
        t0 = time.perf_counter()
        losses_np = gather_part(d, losses, len(plan.indices)).cpu().numpy()  # one device -> host copy per epoch
        sel.observe(plan.indices, losses_np)
        select_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        test_acc = None
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            sync_buffers(d, model)  # then the bare model, the same on every rank, is evaluated
            test_acc = evaluate(model, test, device=device, batch_size=cfg.eval_batch_size, amp=cfg.amp, dist_=d)
        eval_s = time.perf_counter() - t0
        m = part_size(len(plan.indices), d.world) * d.world  # trained: the plan plus the ranks' padding (< world)
        if totals["sample_steps"] + m > totals["total_sample_steps"] >= totals["sample_steps"]:
            log.warning("policy %s planned more than its budget of %d sample-steps; the LR stays at its final "
                        "value for the rest of the run", cfg.policy, totals["total_sample_steps"])
        totals["sample_steps"] += m
        totals["budget_spent"] = totals["sample_steps"] / (cfg.epochs * train.n)
        row = {"sample_steps": m, "train_loss": float(losses_np.mean()) if m else float("nan"), "test_acc": test_acc,
               "wall_s": time.perf_counter() - t_start, **timing, "select_s": select_s, "eval_s": eval_s,
               "lr_end": lr_at(totals["sample_steps"], totals["total_sample_steps"], lr=cfg.lr,
                           schedule=cfg.schedule, warmup=cfg.warmup),
               "samples_done": totals["sample_steps"], "budget_spent": totals["budget_spent"]}
        for t in TIMERS:
            totals[t] += row[t]
        totals["epochs_done"] = epoch + 1
        if test_acc is not None:
            totals["test_acc"] = test_acc
        if out.main:  # history and checkpoint are built only where they are written
            hist = history_columns(train.n, plan.indices, plan.weights, plan.aug, losses_np)
            _write_epoch(out.ws, out.run_id, epoch, {"selected": int(np.count_nonzero(hist["selected"])), **row},
                         train.keys, hist)
            atomic_write_bytes(out.ws.run_dir(out.run_id) / "checkpoint.pt", _checkpoint_bytes(
                config=cfg.to_json(), run_id=out.run_id, epoch=epoch, model=model.state_dict(),
                optimizer=opt.state_dict(), selector=sel.state_dict(), torch_rng=torch.get_rng_state(),
                totals=dict(totals)))
        out.run("running", totals)
        log.info("epoch %d/%d: %d sample-steps, loss %.4f, test_acc %s, %.1f s", epoch + 1, cfg.epochs, m,
                 row["train_loss"], "-" if test_acc is None else f"{test_acc:.4f}", row["wall_s"])
        if stop_after is not None and epoch + 1 >= stop_after and epoch + 1 < cfg.epochs:
            return "stopped"
    return "done"
