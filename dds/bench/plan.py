"""``dds bench-plan``: the time the selector takes to plan one epoch, on synthetic scores."""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from dds.selector import Selector, synthetic_info


def bench_plan(n: int = 1_280_000, classes: int = 1000, policy: str = "dds", *, repeats: int = 5,
               epochs: int = 10, budget: float = 0.5, **policy_options: Any) -> dict:
    """Time planning one pruned epoch on synthetic scores, with losses observed for every sample.

    Args:
        n: samples (ImageNet-1k size by default).
        classes: classes.
        policy: policy to time.
        repeats: timed plans (after one untimed warm-up plan); the median is reported.
        epochs: epochs of the synthetic run (the timed epoch is epoch 1, a pruned one for dds).
        budget: budget of the synthetic run.
        **policy_options: options for the policy.

    Returns:
        {"policy", "n", "classes", "selected" (samples in the plan), "ms_median", "ms_min" (wall-clock
        per plan), "cpu_ms_median" (process CPU time per plan: close to the wall-clock of an idle
        machine when the CPU is shared), "setup_ms" (building the Selector)}.
    """
    info = synthetic_info(n, classes)
    t0 = time.perf_counter()
    sel = Selector(policy, info, epochs=epochs, budget=budget, seed=0, **policy_options)
    setup_ms = (time.perf_counter() - t0) * 1e3
    rng = np.random.default_rng(1)
    sel.observe(np.arange(n), rng.gamma(2.0, 0.5, size=n).astype(np.float32))
    sel.plan(1)
    wall, cpu = [], []
    for _ in range(max(1, repeats)):
        t, c = time.perf_counter(), time.process_time()
        plan = sel.plan(1)
        wall.append((time.perf_counter() - t) * 1e3)
        cpu.append((time.process_time() - c) * 1e3)
    return {"policy": policy, "n": n, "classes": classes, "selected": len(plan),
            "ms_median": round(float(np.median(wall)), 2), "ms_min": round(float(np.min(wall)), 2),
            "cpu_ms_median": round(float(np.median(cpu)), 2), "setup_ms": round(setup_ms, 1)}
