"""``dds bench-dist``: the per-epoch cost of the distributed part of selection, under torchrun."""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.distributed as dist

from dds.distributed import barrier, check_same, gather_part, init, part_entries
from dds.selector import Selector, synthetic_info


def bench_distributed(n: int = 1_280_000, classes: int = 1000, policy: str = "dds", *, repeats: int = 5) -> dict:
    """Per-epoch cost of the distributed parts of selection, on synthetic scores (run under torchrun).

    Every rank plans the same pruned epoch, checks the plans agree (:func:`check_same`), takes its
    part and gathers every rank's per-sample losses back into plan order (:func:`gather_part`),
    then observes them. ``overhead_ms`` is what a single process does not do: check + part + gather.

    Returns:
        ``{"processes", "backend", "n", "classes", "selected", "plan_ms", "check_ms", "part_ms",
        "gather_ms", "observe_ms", "overhead_ms"}``: medians over ``repeats`` epochs, rank 0's clock.
    """
    d = init("cpu")
    sel = Selector(policy, synthetic_info(n, classes), epochs=10, budget=0.5, seed=0)
    losses = np.random.default_rng(1).gamma(2.0, 0.5, size=n).astype(np.float32)
    sel.observe(np.arange(n), losses)
    cpu = torch.device("cpu")
    times: dict[str, list[float]] = {k: [] for k in ("plan", "check", "part", "gather", "observe")}
    m = 0
    for _ in range(max(1, repeats) + 1):  # the first round is a warm-up
        barrier(d)
        t = [time.perf_counter()]
        plan = sel.plan(1)
        t.append(time.perf_counter())
        check_same(d, plan, cpu)
        t.append(time.perf_counter())
        m = len(plan.indices)
        mine = torch.from_numpy(losses[plan.indices[part_entries(m, d.rank, d.world)]])
        t.append(time.perf_counter())
        gathered = gather_part(d, mine, m)
        t.append(time.perf_counter())
        sel.observe(plan.indices, gathered.numpy())
        t.append(time.perf_counter())
        for key, a, b in zip(times, t, t[1:]):
            times[key].append((b - a) * 1e3)
    med = {f"{k}_ms": round(float(np.median(v[1:])), 2) for k, v in times.items()}
    overhead = float(np.median(np.add(np.add(times["check"][1:], times["part"][1:]), times["gather"][1:])))
    return {"processes": d.world, "backend": dist.get_backend() if d.enabled else "none", "n": n,
            "classes": classes, "selected": m, **med, "overhead_ms": round(overhead, 2)}
