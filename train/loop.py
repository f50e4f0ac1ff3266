"""The training loop: selector plan -> batches -> weighted per-sample loss -> SGD -> observe -> evaluate.

Reads top to bottom like nanoGPT's train.py, but as functions, three levels deep: :func:`run_train`
and :func:`resume_train` call ``_run`` (set up, restore, the epoch loop, the run's records), which
calls :func:`train_epoch` for the steps of each epoch. The budget belongs to the selector: the run
reads its ``budget``, ``total_sample_steps`` and ``spent()``. Per epoch::

    plan = selector.plan(epoch)                      # indices (shuffled), weights, aug codes
    for batch in train.plan_batches(plan, ...):      # base/strong augmentation per sample, assembled
                                                     # `prefetch` batches ahead in a background thread
        per_sample = cross_entropy(model(x), y, reduction="none")
        loss = weighted_mean(per_sample, batch weights); SGD step at lr_at(samples consumed)
    selector.observe(plan.indices, per_sample losses of the epoch)
    evaluate on the test split; write epochs/ and history/ parquet; checkpoint

The LR schedule runs over the optimiser steps the run actually takes: before each epoch the
total is re-counted from the plan (steps taken so far + this epoch's plan + the selector's sizes of
the epochs still to come), so every policy reaches the schedule's final value at its last step,
whatever it spends (exactly from the start for policies whose sizes are fixed in advance; for
``infobatch``, whose sizes follow the losses, the estimate is corrected every epoch and exact in the
last). Files are written atomically; :func:`resume_train` continues a run from its last checkpoint
and repeats an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import io
import json
import logging
import math
import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from tqdm import tqdm

from dds import catalog
from dds.device import resolve_device, uses_bf16
from dds.distributed import (Dist, all_sum, broadcast_object, check_same, device_for, gather_part, part_positions,
                             part_size, sync_buffers)
from dds.distributed import init as dist_init
from dds.errors import DdsError
from dds.selector import EpochPlan, Selector, get_policy
from dds.selector.torch import state_to_numpy, state_to_torch, weighted_mean
from dds.tables import check_index_current, check_run_data, dataset_generation, index_info
from dds.train.augment import AUG_NAMES, Augmenter, channel_stats, code_magnitude, normalize
from dds.train.config import TrainConfig
from dds.train.data import Prefetcher, _Split, load_sample_info, open_split
from dds.train.models import create_model
from dds.workspace import Workspace, atomic_write_bytes, atomic_write_json, write_parquet

log = logging.getLogger(__name__)

# data_s: seconds the training thread waited for its next batch, host-to-device copy included (with
#   prefetch the wait on the background thread's queue, ~0 while it keeps ahead; without, the batch's
#   assembly and augmentation); compute_s: forward, backward and optimiser steps; select_s: plan and
#   observe; eval_s: evaluation; wall_s: the epoch end to end.
TIMERS = ("data_s", "compute_s", "select_s", "eval_s", "wall_s")


def lr_at(done: int, total: int, *, lr: float, schedule: str = "cosine", warmup: float = 0.0) -> float:
    """The learning rate at progress ``done / total`` of a run.

    The trainer calls it with ``done`` = the 1-based index of the optimiser step and ``total`` = the
    run's steps, so the last step runs at the schedule's final value.

    Args:
        done: progress so far (>= 0).
        total: progress at the end of the run (> 0); progress past it is held at 1.
        lr: the peak learning rate.
        schedule: "cosine" (from ``lr`` down to 0 at the end) or "constant".
        warmup: fraction of the run with a linear warm-up from 0 to ``lr``, in [0, 1).
    """
    progress = min(done / total, 1.0)
    if progress < warmup:
        return lr * progress / warmup
    if schedule == "constant":
        return lr
    return lr * 0.5 * (1.0 + math.cos(math.pi * (progress - warmup) / (1.0 - warmup)))


def new_run_id(dataset: str, policy: str) -> str:
    """``{dataset}-{policy}-{YYYYmmdd-HHMMSS}-{4 hex}``."""
    return f"{dataset}-{policy}-{datetime.datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def history_columns(n: int, indices: np.ndarray, weights: np.ndarray, aug: np.ndarray,
                    losses: np.ndarray, labels: np.ndarray | None = None,
                    status: np.ndarray | None = None) -> dict[str, pa.Array]:
    """One row per train sample for one epoch: selected, count, weight, aug, magnitude, loss,
    label_used (null if unselected) and status.

    Args:
        n: number of train samples N.
        indices, weights, aug, losses: ``(M,)`` plan indices (int64), weights (float32), aug codes
            (uint8) and unweighted per-sample losses (float32) of the epoch.
        labels: ``(M,)`` labels the planned samples were trained on (None: no label column).
        status: ``(N,)`` codes into ``STATUSES`` of the epoch (None: all null).

    Returns:
        Columns of length N in ``samples.idx`` order; a sample planned twice gets its mean weight
        and loss, aug "strong" when any of its steps was strong, and the mean strong-augmentation
        magnitude of its steps (0 = base; :func:`dds.train.augment.code_magnitude`).
    """
    from dds.selector import STATUSES

    count = np.bincount(indices, minlength=n)
    selected = count > 0
    denom = np.maximum(count, 1)
    weight = np.bincount(indices, weights=weights, minlength=n) / denom
    loss = np.bincount(indices, weights=losses, minlength=n) / denom
    strong = np.bincount(indices, weights=(aug >= 1), minlength=n) > 0
    aug_name = np.where(strong, AUG_NAMES[1], AUG_NAMES[0]).astype(object)
    aug_name[~selected] = None
    magnitude = np.bincount(indices, weights=code_magnitude(aug), minlength=n) / denom
    cols = {"selected": pa.array(selected), "count": pa.array(count.astype(np.int32)),
            "weight": pa.array(weight.astype(np.float32), mask=~selected),
            "aug": pa.array(aug_name, type=pa.string()),
            "magnitude": pa.array(magnitude.astype(np.float32), mask=~selected),
            "loss": pa.array(loss.astype(np.float32), mask=~selected)}
    if labels is not None:
        used = np.zeros(n, np.int32)
        used[indices] = labels
        cols["label_used"] = pa.array(used, mask=~selected)
    names = np.asarray(STATUSES, dtype=object)
    cols["status"] = pa.nulls(n, pa.string()) if status is None else pa.array(names[status], type=pa.string())
    return cols


@torch.inference_mode()
def evaluate(model: torch.nn.Module, split, *, device: torch.device, batch_size: int, amp: bool,
             channels_last: bool = False, dist_: Dist = Dist()) -> float:
    """Top-1 accuracy of ``model`` on every sample of ``split`` (no augmentation).

    In a distributed job each rank scores every ``world``-th batch and the counts are summed.
    """
    model.eval()
    mean, std = channel_stats(split.mean, split.std, device)
    fmt = _memory_format(device, channels_last)
    correct = torch.zeros((), dtype=torch.int64, device=device)  # summed on device: one sync at the end
    for i, batch in enumerate(split.eval_batches(batch_size)):
        if i % dist_.world != dist_.rank:
            continue
        x = normalize(batch["image"].to(device, non_blocking=True), mean, std)
        x = x.contiguous(memory_format=fmt)
        with _autocast(device, amp):
            logits = model(x)
        correct += (logits.argmax(1) == batch["label"].to(device, non_blocking=True)).sum()
    return all_sum(dist_, correct).item() / split.n


def _autocast(device: torch.device, amp: bool):
    """bf16 autocast where it is fast (CUDA, or a CPU with AMX: :func:`dds.device.uses_bf16`), else fp32."""
    if uses_bf16(device, amp):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _memory_format(device: torch.device, channels_last: bool) -> torch.memory_format:
    """channels_last on CPU when asked (resnet20's bare step ~1.2x faster here; `dds bench-train`), else contiguous."""
    return torch.channels_last if channels_last and device.type == "cpu" else torch.contiguous_format


def prefetch_depth(prefetch: int | None, device: torch.device) -> int:
    """Batches to build ahead: ``prefetch``, or with None 2 on CUDA (the CPU is free while the GPU computes)
    and 0 on the CPU, where the prefetching thread competes with the model for the same cores."""
    if prefetch is not None:
        return prefetch
    return 2 if device.type == "cuda" else 0


def epoch_steps(m: int, batch_size: int, world: int = 1) -> int:
    """Optimiser steps of an epoch of ``m`` planned samples (each rank trains its part in batches of
    ``batch_size / world``; all ranks take the same number of steps)."""
    return math.ceil(part_size(m, world) / (batch_size // world)) if m else 0


@dataclass
class RunState:
    """What a run has done so far: counters, timers and the last evaluation (saved in every checkpoint).

    Config lives in :class:`TrainConfig` and the budget in the :class:`~dds.selector.Selector` (its
    ``budget``, ``total_sample_steps``, ``follows_budget`` and ``spent()``); this is the rest.
    """

    run_id: str
    epochs_done: int = 0
    sample_steps: int = 0  # samples trained so far (distributed padding included)
    steps: int = 0  # optimiser steps taken so far
    total_steps: int = 0  # the run's steps as counted before the latest epoch (exact once the last epoch is planned)
    test_acc: float | None = None  # the latest evaluation
    dataset_generation: str | None = None  # id of the dataset generation trained on (dds.tables.dataset_generation)
    index_generation: str | None = None  # id of the index generation whose scores the selector read (None: no scores)
    reason: str | None = None  # why the run failed or stopped (None while it runs or when done)
    timers: dict[str, float] = field(default_factory=lambda: {t: 0.0 for t in TIMERS})

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any]) -> "RunState":
        """The state a checkpoint saved (older checkpoints also saved the budget fields: the selector's now)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})

    def summary(self, status: str, sel: Selector) -> dict[str, Any]:
        """The flat dict ``run_train`` returns and the runs table stores, with the budget as ``sel`` ran it."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "timers"}
        return {"status": status, **out, **budget_columns(sel), **self.timers,
                "train_s": self.timers["data_s"] + self.timers["compute_s"] + self.timers["select_s"]}


def budget_columns(sel: Selector) -> dict[str, Any]:
    """The budget a run ran at and what it spent, from its selector: budget (as used), total_sample_steps,
    follows_budget and budget_spent (``sel.spent()`` as a fraction of ``epochs * N``)."""
    return {"budget": sel.budget, "total_sample_steps": sel.total_sample_steps, "follows_budget": sel.follows_budget,
            "budget_spent": sel.spent() / (sel.epochs * sel.n)}


def train_epoch(model: torch.nn.Module, opt: torch.optim.Optimizer, train: _Split, plan: EpochPlan, *,
                cfg: TrainConfig, device: torch.device, augmenter: Augmenter, steps_done: int, total_steps: int,
                progress: bool, dist_: Dist = Dist()) -> tuple[torch.Tensor, dict[str, float]]:
    """Train one epoch on ``plan``; returns the (P,) per-sample losses of this rank's part (on device;
    P = M in a single process) and its timings (plus ``lr_first``/``lr_last``, the LR of its first and
    last step). A distributed rank trains its part (:func:`dds.distributed.part_positions`) in
    batches of ``batch_size / world``; step k of the run (1-based) runs at ``lr_at(k, total_steps)``.

    With a prefetch depth > 0 (:func:`prefetch_depth`) the batches are assembled and augmented by a :class:`Prefetcher`
    thread up to that many batches ahead, while this thread computes; they are the same batches in
    the same order as without it. ``data_s`` is the time this thread waited for a batch (see TIMERS)."""
    model.train()
    positions = part_positions(len(plan.indices), dist_.rank, dist_.world) if dist_.enabled else None
    m = len(plan.indices) if positions is None else len(positions)
    losses = torch.empty(m, dtype=torch.float32, device=device)  # kept on device: copied once per epoch
    mean, std = channel_stats(train.mean, train.std, device)  # once per epoch, not per batch
    fmt = _memory_format(device, cfg.channels_last)
    label_of = None
    if plan.labels is not None:   # the plan trains some samples on other labels than the dataset's
        label_of = torch.from_numpy(train.labels.copy())
        label_of[torch.from_numpy(plan.indices)] = torch.from_numpy(plan.labels)
    timing = {"data_s": 0.0, "compute_s": 0.0, "lr_first": None, "lr_last": None}
    step = steps_done
    bar = tqdm(total=m, desc=f"epoch {plan.epoch + 1}/{cfg.epochs}", unit="img", disable=not progress)
    batches = train.plan_batches(plan, seed=cfg.seed, augmenter=augmenter,
                                 batch_size=cfg.batch_size // dist_.world, positions=positions)
    depth = prefetch_depth(cfg.prefetch, device)
    feed = Prefetcher(batches, depth) if depth else contextlib.nullcontext(iter(batches))
    done = 0
    with feed as batches:  # leaving it (end of the plan, an error, Ctrl-C) stops the prefetch thread
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)  # this thread's wait: the prefetch queue, or assembly + augmentation
            if batch is None:
                break
            b = len(batch["label"])
            x = batch["image"].to(device, non_blocking=True)  # uint8 over the bus, normalised on device
            y = batch["label"] if label_of is None else label_of[batch["index"]]  # corrected labels where relabelled
            y = y.to(device, non_blocking=True)
            w = batch["weight"].to(device, non_blocking=True)
            t1 = time.perf_counter()
            step += 1
            lr = lr_at(step, total_steps, lr=cfg.lr, schedule=cfg.schedule, warmup=cfg.warmup)
            for group in opt.param_groups:
                group["lr"] = lr
            timing["lr_last"] = lr
            if timing["lr_first"] is None:
                timing["lr_first"] = lr
            with _autocast(device, cfg.amp):
                logits = model(normalize(x, mean, std).contiguous(memory_format=fmt))
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
    torch.save(state_to_torch(state), buf)
    return buf.getvalue()


def _read_checkpoint(source: Path | bytes, what: str) -> dict[str, Any]:
    """A checkpoint from its file or its bytes already read."""
    try:  # weights_only: tensors, containers and scalars only, so a crafted file cannot run code
        return torch.load(io.BytesIO(source) if isinstance(source, bytes) else source, map_location="cpu",
                          weights_only=True)
    except Exception as e:  # torch raises UnpicklingError or RuntimeError for files it refuses
        raise DdsError(f"{what} is not a dds checkpoint ({type(e).__name__})") from None


def save_checkpoint(run_dir: Path, data: bytes) -> None:
    """Write ``checkpoint.pt`` with its sha256 in ``checkpoint.json``, so a resume can verify it.

    The sidecar is written first and names the new checkpoint's sha256 and that of the file on disk:
    a kill between the two writes leaves the previous checkpoint, which still verifies.
    """
    path = run_dir / "checkpoint.pt"
    previous = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None
    atomic_write_json(run_dir / "checkpoint.json", {"sha256": hashlib.sha256(data).hexdigest(), "previous": previous})
    atomic_write_bytes(path, data)


def _load_checkpoint(ws: Workspace, run_id: str) -> dict[str, Any] | None:
    """The run's last checkpoint, verified against ``checkpoint.json``; None when it stopped before
    its first epoch ended."""
    path = ws.run_dir(run_id) / "checkpoint.pt"
    if not path.exists():
        return None
    side = path.with_suffix(".json")
    refuse = f"so run '{run_id}' cannot be resumed; start a new run"
    data = path.read_bytes()   # read once: hashed, then loaded
    if side.exists():
        try:
            sums = json.loads(side.read_text())
        except (OSError, ValueError):
            raise DdsError(f"{side} is unreadable, so checkpoint {path} cannot be verified; {refuse}") from None
        if hashlib.sha256(data).hexdigest() not in (sums.get("sha256"), sums.get("previous")):
            raise DdsError(f"checkpoint {path} is not a dds checkpoint as written: its sha256 differs from the one "
                           f"in {side.name} (damaged or changed since), {refuse}")
    state = _read_checkpoint(data, f"checkpoint of run '{run_id}' (it cannot be resumed)")
    if not side.exists() and "card" in state:  # written with a checksum: its sidecar must be there
        raise DdsError(f"{side} is missing, so checkpoint {path} cannot be verified; {refuse}")
    return state


def load_trained(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model a run trained, from its ``runs/RUN_ID/checkpoint.pt``, on the CPU in eval mode.

    The checkpoint is rewritten after every epoch: once the run is ``done`` it holds the final weights.

    Returns:
        ``(model, card)``; ``card`` holds what inputs need: ``classes`` (names by label), ``channels``,
        ``image_size``, ``mean`` and ``std`` (uint8 ``(B, C, S, S)`` images go through
        :func:`dds.train.augment.normalize` with them), and ``config`` (the run's :class:`TrainConfig` as a dict).

    Raises:
        DdsError: no such file, or a file that is not a checkpoint of this version of dds.
    """
    path = Path(path)
    if not path.is_file():
        raise DdsError(f"no checkpoint at {path}; a run writes it to WORKSPACE/runs/RUN_ID/checkpoint.pt")
    ckpt = _read_checkpoint(path, str(path))
    if "card" not in ckpt:
        raise DdsError(f"{path} was written by an older dds, without the dataset's classes and geometry; train the "
                       "run again to load it with load_trained")
    card = {**ckpt["card"], "config": json.loads(ckpt["config"])}
    cfg = TrainConfig.from_dict(card["config"])
    model = create_model(cfg.model, len(card["classes"]), card["channels"], card["image_size"])
    model.load_state_dict(ckpt["model"])
    return model.eval(), card


def _write_run(ws: Workspace, cfg: TrainConfig, sel: Selector, state: RunState, status: str) -> None:
    row = {"dataset": cfg.dataset, "policy": cfg.policy, "epochs": cfg.epochs, "seed": cfg.seed,
           "config": resolved_config(cfg, sel), "model": cfg.model, **state.summary(status, sel),
           "pid": os.getpid(), "host": socket.gethostname(),
           "updated": datetime.datetime.now().isoformat(timespec="seconds")}
    schema = {"epochs": pa.int32(), "seed": pa.int32(), "epochs_done": pa.int32(), "test_acc": pa.float64(),
              "pid": pa.int64(), "dataset_generation": pa.string(), "index_generation": pa.string(),
              "reason": pa.string()}
    run_id = state.run_id
    atomic_write_json(ws.run_dir(run_id) / "run.json", row)
    write_parquet(ws.run_dir(run_id) / "run.parquet",
                  pa.table({k: pa.array([v], type=schema.get(k)) for k, v in row.items()}))


def resolved_config(cfg: TrainConfig, sel: Selector) -> str:
    """``cfg`` as json with ``policy_options`` resolved by ``sel``: every option of the policy's config
    dataclass, defaults filled in (what ``runs.config`` and the checkpoint store; a run restarted from
    it plans the same)."""
    return dataclasses.replace(cfg, policy_options=dataclasses.asdict(sel.config)).to_json()


def _write_epoch(ws: Workspace, run_id: str, epoch: int, row: dict[str, Any], keys: np.ndarray,
                 hist: dict[str, pa.Array]) -> None:
    run_dir = ws.run_dir(run_id)
    types = {"epoch": pa.int32(), "selected": pa.int64(), "sample_steps": pa.int64(), "test_acc": pa.float64(),
             "lr_first": pa.float64(), "lr_last": pa.float64(), "steps": pa.int64(), "total_steps": pa.int64(),
             "held_out_gap": pa.float64()}
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


def run_train(ws: Workspace, cfg: TrainConfig, *, progress: bool = True, stop_after: int | None = None,
              data: tuple | None = None, announce: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train a new run; writes runs/{run_id}/run.parquet, epochs/, history/ and checkpoint.pt.

    Args:
        ws: the workspace.
        cfg: the run's config (not modified).
        progress: show a tqdm bar per epoch.
        stop_after: stop after this many epochs in total (status "stopped", resumable); for tests.
        data: ``(train, eval)`` splits from :func:`dds.train.data.open_split` to reuse (``dds bench``).
        announce: called with the run id once it exists, before the first epoch (the CLI prints it
            with the resume command); on the main rank only.

    Returns:
        :meth:`RunState.summary`: run_id, status, test_acc (last evaluation), budget (as the selector
        ran it), budget_spent (its ``spent()`` as a fraction of epochs * N), follows_budget, sample_steps,
        total_sample_steps, steps, total_steps, epochs_done and the summed timers data_s, compute_s,
        select_s, eval_s, wall_s and train_s (= data_s + compute_s + select_s).

    Raises:
        DdsError: bad config, unknown policy/model, missing dataset or eval split.
    """
    if not isinstance(cfg, TrainConfig):
        raise DdsError("run_train needs a TrainConfig; resume a run with resume_train(ws, run_id)")
    return _run(ws, cfg, None, run_id=None, progress=progress, stop_after=stop_after, data=data, announce=announce)


def resume_train(ws: Workspace, run_id: str, *, progress: bool = True, stop_after: int | None = None,
                 data: tuple | None = None, dataset: str | None = None,
                 announce: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Continue ``run_id`` from its last checkpoint with its saved config; repeats an uninterrupted run.

    ``dataset``: when given, the run must have trained on it (the CLI passes its NAME argument).

    Raises:
        DdsError: no such run in this workspace, no checkpoint, a file that is not a dds checkpoint,
            or a run of another dataset.
    """
    ckpt = _load_checkpoint(ws, ws.check_run_id(run_id))
    if ckpt is None:   # stopped before its first checkpoint: start it again under the same id
        run_json = ws.run_dir(run_id) / "run.json"
        if not run_json.exists():
            raise DdsError(f"run '{run_id}' has neither a checkpoint nor run.json; start a new run instead")
        saved = TrainConfig.from_json(json.loads(run_json.read_text())["config"])
    else:
        saved = TrainConfig.from_json(ckpt["config"])
    if dataset is not None and dataset != saved.dataset:
        raise DdsError(f"run '{run_id}' trained on dataset {saved.dataset}, not {dataset}")
    return _run(ws, _as_saved(saved), ckpt, run_id=run_id, progress=progress, stop_after=stop_after, data=data,
                announce=announce)


def _as_saved(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the options a run saved by an older dds ran under: when its ``policy_options`` hold
    every option known before its policy's ``saved_defaults`` (resolved when saved), those it lacks
    take their ``saved_defaults`` value. Raw options (older still) keep today's defaults."""
    policy, opts = get_policy(cfg.policy), cfg.policy_options
    missing = {k: v for k, v in policy.saved_defaults.items() if k not in opts}
    known_before = {f.name for f in dataclasses.fields(policy.Config)} - set(policy.saved_defaults)
    if not missing or not known_before <= set(opts):
        return cfg
    return dataclasses.replace(cfg, policy_options={**opts, **missing})


@dataclass
class _Trainee:
    """What a run trains with (built by :func:`_setup`): its selector, model, optimiser and splits, and where."""

    sel: Selector
    model: torch.nn.Module  # the bare model: evaluated and saved
    net: torch.nn.Module  # what is trained: ``model``, or its DistributedDataParallel wrapper in a distributed job
    opt: torch.optim.Optimizer
    train: _Split
    test: _Split
    device: torch.device
    dist: Dist


def _run(ws: Workspace, cfg: TrainConfig, ckpt: dict[str, Any] | None, *, run_id: str | None, progress: bool,
         stop_after: int | None, data: tuple | None, announce: Callable[[str], None] | None) -> dict[str, Any]:
    """A new run (``run_id`` None), a run restarted under its id (no checkpoint yet) or a resume from ``ckpt``.

    The main process holds the dataset's lock shared for the whole run, so `dds shard` cannot
    replace the data under it; a resume must find the dataset and index generations it started on.
    The run's own lock lets one process at a time train it. ``progress`` shows tqdm bars on the main rank.
    """
    cfg.validate()
    d = dist_init(cfg.device)
    if cfg.batch_size % d.world:
        raise DdsError(f"batch_size {cfg.batch_size} is the global batch and must split evenly over the {d.world} "
                       f"processes; use a multiple of {d.world}")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    rid = ckpt["state"]["run_id"] if ckpt is not None else broadcast_object(
        d, run_id or new_run_id(cfg.dataset, cfg.policy))
    ws.dataset_info(cfg.dataset)  # a clear error for a missing dataset before its folder is locked
    with contextlib.ExitStack() as held:
        if d.is_main:
            held.enter_context(ws.lock(cfg.dataset, shared=True, holder=f"run {rid}"))
        gens = {"dataset_generation": dataset_generation(ws, cfg.dataset),
                "index_generation": index_info(ws, cfg.dataset, cfg.encoder).get("generation")}
        if ckpt is not None:
            check_run_data(ws, {"run_id": rid, "dataset": cfg.dataset, "config": {"encoder": cfg.encoder},
                                **{k: ckpt["state"].get(k) for k in gens}})
        run = _setup(ws, cfg, d, data, ckpt)
        sel = run.sel
        if ckpt is None:
            state = RunState(run_id=rid, dataset_generation=gens["dataset_generation"],
                             index_generation=gens["index_generation"] if sel.info.has_scores else None)
        else:
            state = RunState.from_checkpoint(ckpt["state"])
            log.info("resuming %s at epoch %d", rid, state.epochs_done)
        if d.is_main:
            log.info("run %s: %s, %s, %d train / %d %s samples, budget %d sample-steps, %s", rid, cfg.model,
                     cfg.optimizer, run.train.n, run.test.n, cfg.eval_split, sel.total_sample_steps, run.device)
            held.enter_context(ws.lock(ws.run_dir(rid), f"run {rid}"))  # a second --resume of a live run is refused
            if run_id is not None or ckpt is not None:
                _drop_later_epochs(ws, rid, state.epochs_done - 1)  # files written after the checkpoint are redone
        out = _Writer(ws, cfg, sel, state, main=d.is_main)
        augmenter = Augmenter(run.train.image_size, run.train.channels)
        status = "done"
        try:  # every write of the run's status is inside: a full disk there too marks the run failed
            out.run("running")
            if announce is not None and d.is_main:
                announce(rid)
            for epoch in range(state.epochs_done, cfg.epochs):
                t_start = time.perf_counter()
                plan = sel.plan(epoch)
                check_same(d, plan, run.device)
                state.total_steps = state.steps + _planned_steps(sel, epoch, len(plan), cfg, d.world)
                select_s = time.perf_counter() - t_start
                losses, timing = train_epoch(run.net, run.opt, run.train, plan, cfg=cfg, device=run.device,
                                             augmenter=augmenter, steps_done=state.steps,
                                             total_steps=state.total_steps, progress=progress and d.is_main, dist_=d)
                t0 = time.perf_counter()
                losses_np = gather_part(d, losses, len(plan)).cpu().numpy()  # one device -> host copy per epoch
                sel.observe(plan.indices, losses_np, plan.aug)
                select_s += time.perf_counter() - t0
                t0 = time.perf_counter()
                test_acc = _evaluate_after(run, cfg, epoch, len(plan))
                eval_s = time.perf_counter() - t0
                times = {"wall_s": time.perf_counter() - t_start, **timing, "select_s": select_s, "eval_s": eval_s}
                row = _count_epoch(state, sel, epoch, len(plan), losses_np, test_acc, times, cfg=cfg, world=d.world)
                out.epoch(epoch, plan, losses_np, row, run)
                log.info("%s", epoch_line(cfg.policy, epoch, cfg.epochs, row))
                if stop_after is not None and epoch + 1 >= stop_after and epoch + 1 < cfg.epochs:
                    status = "stopped"
                    break
            out.run(status)
        except KeyboardInterrupt:
            out.mark("stopped", "interrupted")
            raise
        except BaseException as e:
            out.mark("failed", f"{type(e).__name__}: {e}")
            raise
        return state.summary(status, sel)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over every parameter of ``model``: SGD (momentum, Nesterov) or AdamW.

    The LR given here is the peak; the loop sets each step's LR from :func:`lr_at`.
    """
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


def _setup(ws: Workspace, cfg: TrainConfig, d: Dist, data: tuple | None, ckpt: dict[str, Any] | None) -> _Trainee:
    """Selector, model (on this rank's device), optimiser, train and evaluation splits of a run, restored
    from ``ckpt`` when given (with the global torch RNG), the model wrapped for DDP in a distributed job.

    The selector and the model come first: they are cheap and reject unknown names and a bad budget
    before any decoding; then the evaluation split (``cfg.eval_split``; its absence is an error), then train.
    """
    device = device_for(d, resolve_device(cfg.device))
    info = ws.dataset_info(cfg.dataset)
    need_scores = get_policy(cfg.policy).needs_scores
    sample_info = load_sample_info(ws, cfg.dataset, cfg.encoder, need_scores=need_scores)
    if need_scores and not sample_info.has_scores:
        raise DdsError(f"policy {cfg.policy} needs the scores of {cfg.dataset} under encoder {cfg.encoder}: run "
                       f"`dds embed {cfg.dataset} --encoder {cfg.encoder}` and `dds index {cfg.dataset} "
                       f"--encoder {cfg.encoder}` first")
    if sample_info.has_scores:   # scores made on the train samples in use, not on those of an earlier shard
        check_index_current(ws, cfg.dataset, cfg.encoder)
    sel = Selector(cfg.policy, sample_info, epochs=cfg.epochs, budget=cfg.budget, seed=cfg.seed, **cfg.policy_options)
    with torch.random.fork_rng(devices=[]):  # model init from the run's seed, global RNG left untouched
        torch.manual_seed(cfg.seed)
        model = create_model(cfg.model, len(info["classes"]), int(info["channels"]), int(info["image_size"]))
    model.to(device=device, memory_format=_memory_format(device, cfg.channels_last))
    opt = make_optimizer(model, cfg)
    if data is None:
        test = open_split(ws, cfg.dataset, cfg.eval_split, cache=cfg.cache, decode_workers=cfg.decode_workers)
        train = open_split(ws, cfg.dataset, "train", cache=cfg.cache, decode_workers=cfg.decode_workers)
    else:
        train, test = data
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])  # moves the momentum buffers to the parameters' device
        sel.load_state_dict(state_to_numpy(ckpt["selector"]))
        torch.set_rng_state(ckpt["torch_rng"])
    net = model
    if d.enabled:  # gradients averaged over the ranks; the checkpoint keeps the bare model's state
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return _Trainee(sel=sel, model=model, net=net, opt=opt, train=train, test=test, device=device, dist=d)


def _evaluate_after(run: _Trainee, cfg: TrainConfig, epoch: int, m: int) -> float | None:
    """Accuracy on the evaluation split after ``epoch`` (``m`` samples trained), or None when no evaluation is
    due: every ``eval_every`` epochs and after the last; an empty epoch (``budgeted`` after its budget) only
    if it is the last."""
    if epoch + 1 != cfg.epochs and not (m and (epoch + 1) % cfg.eval_every == 0):
        return None
    sync_buffers(run.dist, run.model)  # then the bare model, the same on every rank, is evaluated
    return evaluate(run.model, run.test, device=run.device, batch_size=cfg.eval_batch_size, amp=cfg.amp,
                    channels_last=cfg.channels_last, dist_=run.dist)


def _count_epoch(state: RunState, sel: Selector, epoch: int, m_plan: int, losses: np.ndarray,
                 test_acc: float | None, times: dict[str, Any], *, cfg: TrainConfig, world: int) -> dict[str, Any]:
    """Add an epoch of ``m_plan`` planned samples to ``state``; returns its row of the ``epochs`` table
    (without ``selected``). ``times``: the epoch's timers and its first and last LR."""
    m = part_size(m_plan, world) * world  # trained: the plan plus the ranks' padding (< world)
    steps = epoch_steps(m_plan, cfg.batch_size, world)
    state.sample_steps += m
    state.steps += steps
    row = {"sample_steps": m, "train_loss": float(losses.mean()) if m else float("nan"), "test_acc": test_acc,
           **times, "steps": steps, "total_steps": state.total_steps, "samples_done": state.sample_steps,
           "budget_spent": budget_columns(sel)["budget_spent"], "held_out_gap": sel.held_out_gap()}
    for t in TIMERS:
        state.timers[t] += row[t]
    state.epochs_done = epoch + 1
    if test_acc is not None:
        state.test_acc = test_acc
    return row


class _Writer:
    """Where a run's files go; in a distributed job only rank 0 writes (the others' calls do nothing)."""

    def __init__(self, ws: Workspace, cfg: TrainConfig, sel: Selector, state: RunState, *, main: bool) -> None:
        self.ws, self.cfg, self.sel, self.state, self.main = ws, cfg, sel, state, main
        self.card: dict[str, Any] | None = None

    def run(self, status: str) -> None:
        """The run's row in ``runs``."""
        if self.main:
            _write_run(self.ws, self.cfg, self.sel, self.state, status)
            catalog.refresh(self.ws)

    def mark(self, status: str, reason: str) -> None:
        """The run's row for a run that ends on an error (``reason``), written while that error is
        raised: a failure to write it (the disk is still full) is logged, never raised over it."""
        self.state.reason = reason
        try:
            self.run(status)
        except Exception as e:
            log.error("could not record run %s as %s (%s): %s", self.state.run_id, status, reason, e)

    def epoch(self, epoch: int, plan: EpochPlan, losses: np.ndarray, row: dict[str, Any], run: _Trainee) -> None:
        """An epoch's row in ``epochs``, its per-sample ``history``, the checkpoint and the run's row."""
        if self.main:  # history and checkpoint are built only where they are written
            train, state = run.train, self.state
            used = train.labels[plan.indices] if plan.labels is None else plan.labels
            hist = history_columns(train.n, plan.indices, plan.weights, plan.aug, losses, used, self.sel.status())
            _write_epoch(self.ws, state.run_id, epoch, {"selected": int(np.count_nonzero(hist["selected"])), **row},
                         train.keys, hist)
            if self.card is None:  # what load_trained needs
                self.card = {"classes": list(self.ws.dataset_info(self.cfg.dataset)["classes"]),
                             "channels": train.channels, "image_size": train.image_size, "mean": train.mean,
                             "std": train.std}
            save_checkpoint(self.ws.run_dir(state.run_id), _checkpoint_bytes(
                config=resolved_config(self.cfg, self.sel), card=self.card, epoch=epoch, model=run.model.state_dict(),
                optimizer=run.opt.state_dict(), selector=self.sel.state_dict(), torch_rng=torch.get_rng_state(),
                state=dataclasses.asdict(state)))
        self.run("running")


def epoch_line(policy: str, epoch: int, epochs: int, row: dict[str, Any]) -> str:
    """One log line per epoch: samples trained, mean loss, accuracy when evaluated, training img/s, seconds
    (an epoch that trains nothing says so, with its accuracy when evaluated).

    ``row`` is the epoch's row of the ``epochs`` table (sample_steps, train_loss, test_acc, data_s,
    compute_s, wall_s); img/s counts the time spent on batches (data_s + compute_s).
    """
    acc = "" if row["test_acc"] is None else f", acc {row['test_acc']:.4f}"
    if not row["sample_steps"]:   # e.g. ``budgeted`` once its budget is spent: no loss nor rate to show
        return f"{policy} epoch {epoch + 1}/{epochs}: nothing planned{acc}"
    busy = row["data_s"] + row["compute_s"]
    rate = row["sample_steps"] / busy if busy > 0 else 0.0
    return (f"{policy} epoch {epoch + 1}/{epochs}: {row['sample_steps']} samples, loss {row['train_loss']:.4f}{acc}, "
            f"{rate:.0f} img/s, {row['wall_s']:.1f} s")


def _planned_steps(sel: Selector, epoch: int, m: int, cfg: TrainConfig, world: int) -> int:
    """Steps of ``epoch`` (``m`` planned samples) plus the steps the selector expects after it."""
    later = sel.epoch_sizes()[epoch + 1:]
    return epoch_steps(m, cfg.batch_size, world) + sum(epoch_steps(int(s), cfg.batch_size, world) for s in later)
