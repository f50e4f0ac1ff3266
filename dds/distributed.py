"""torch.distributed for ``dds embed`` and ``dds train`` under ``torchrun``.

A process started by ``torchrun`` finds ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous
address in its environment; :func:`init` joins the process group (NCCL for CUDA, gloo on CPU) and
returns a :class:`Dist`. Without those variables (a plain ``dds`` call) it returns the
single-process ``Dist`` and nothing here talks to other processes.

How an epoch plan is shared belongs to the selector (:mod:`dds.selector._parts`: each rank's part;
:func:`dds.selector.torch.gather_part`: the losses back in plan order), re-exported here for the
trainer; with a per-rank batch of ``batch_size / world`` the ranks' ``k``-th batches together are
the ``k``-th batch of a single-process run. The per-sample losses of all ranks are gathered before
``observe``, so every rank's selector state stays the same; :func:`check_same` compares a checksum
of each rank's plan to catch any divergence.
"""
from __future__ import annotations

import atexit
import datetime
import logging
import os
import sys
import uuid
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from dds.errors import DdsError
# the selector's plan parts, re-exported: the trainer and its tests use them from here
from dds.selector._parts import Dist, interleave, part_entries, part_positions, part_size  # noqa: F401
from dds.selector.torch import gather_part  # noqa: F401

log = logging.getLogger(__name__)


def from_env() -> Dist:
    """The ``Dist`` described by torchrun's environment variables (single-process when absent)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Dist()
    return Dist(rank=int(os.environ["RANK"]), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def init(device: str = "auto") -> Dist:
    """Join torchrun's process group (once per process) and return this process's ``Dist``.

    Args:
        device: the run's ``--device`` (auto, cpu, cuda): NCCL when CUDA is used, else gloo.
            With CUDA each process uses GPU ``LOCAL_RANK``.
    """
    d = from_env()
    if not d.enabled or dist.is_initialized():
        return d
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(_gpu_index(d))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    atexit.register(_shutdown)
    log.info("rank %d of %d joined the process group (%s)", d.rank, d.world, dist.get_backend())
    return d


def _gpu_index(d: Dist) -> int:
    """GPU ``LOCAL_RANK``; 0 where the launcher shows each process a single GPU."""
    count = torch.cuda.device_count()
    if d.local_rank < count:
        return d.local_rank
    if count == 1:
        return 0
    raise DdsError(f"local rank {d.local_rank} has no GPU ({count} visible); start fewer processes per machine "
                   "(--nproc / --nproc-per-node) or use --device cpu")


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def device_for(d: Dist, device: torch.device) -> torch.device:
    """This rank's GPU for a CUDA device in a distributed job, else ``device`` unchanged."""
    if d.enabled and device.type == "cuda":
        return torch.device("cuda", _gpu_index(d))
    return device


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def broadcast_object(d: Dist, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (picklable objects, e.g. a run id)."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(d: Dist, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not d.enabled:
        return [obj]
    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def all_sum(d: Dist, value: torch.Tensor) -> torch.Tensor:
    """``value`` summed over the ranks (in place; returned for convenience)."""
    if d.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def sync_buffers(d: Dist, model: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts them at the start of each forward pass, so after the last training step each
    rank holds its own update; this makes the ranks' models equal before evaluation.
    """
    if d.enabled:
        for buf in model.buffers():
            dist.broadcast(buf, src=0)


def plan_checksum(indices: np.ndarray, aug: np.ndarray | None = None, weights: np.ndarray | None = None) -> int:
    """A 63-bit checksum of a plan that depends on the order of its indices, and on aug and weights."""
    idx = np.asarray(indices, dtype=np.uint64)
    x = (idx + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
    x ^= np.arange(idx.shape[0], dtype=np.uint64)  # mixes the position in before the second multiply
    if aug is not None:
        x ^= np.asarray(aug, dtype=np.uint64) << np.uint64(40)
    if weights is not None:
        x ^= np.asarray(weights, dtype=np.float32).view(np.uint32).astype(np.uint64) << np.uint64(8)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(31)
    return (int(x.sum(dtype=np.uint64)) ^ idx.shape[0]) & (2**63 - 1)


def check_same(d: Dist, plan, device: torch.device) -> None:
    """Raise DdsError when the ranks planned different epochs (an EpochPlan: they must be identical)."""
    if not d.enabled:
        return
    mine = torch.tensor([plan_checksum(plan.indices, plan.aug, plan.weights)], dtype=torch.int64, device=device)
    out = [torch.empty_like(mine) for _ in range(d.world)]
    dist.all_gather(out, mine)
    if len({int(t.item()) for t in out}) != 1:
        raise DdsError(f"the ranks planned different samples for epoch {plan.epoch}; every rank must see the same "
                       "dataset, scores and config (same workspace, same --seed)")


# ---------------------------------------------------------------- launching

def launch(nproc: int, argv: list[str]) -> int:
    """Run ``python -m dds ARGV`` in ``nproc`` processes on this machine; the exit code of a failed one, or 0.

    ``dds embed/train --nproc N`` call this. It uses torchrun's own launcher API with torchrun's
    ``--standalone`` settings, so it is ``torchrun --standalone --nproc-per-node N -m dds ARGV``
    without torchrun parsing ARGV (whose options could clash with its own).
    """
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
    log.info("launching %d processes: python -m dds %s", nproc, " ".join(argv))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the ranks print their own errors
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as torchrun does for several processes per machine
    try:
        elastic_launch(config, sys.executable)("-m", "dds", *argv)
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values()]
        return next((c for c in codes if c and c > 0), 1)
    return 0
