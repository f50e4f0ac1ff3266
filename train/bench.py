"""``dds bench``: every policy x seed in one process on the same decoded data, summarised per policy.

Rows go to ``bench/{bench_id}.parquet`` (catalog view ``bench``). Wall-clock ratios are relative
to the ``full`` policy of the same bench (NaN when ``full`` is not among the policies).
"""
from __future__ import annotations

import datetime
import logging
import math
import secrets
from typing import Any

import numpy as np
import pyarrow as pa

from dds import catalog
from dds._validate import check_fraction, check_positive_int
from dds.distributed import from_env
from dds.errors import DdsError
from dds.train.config import TrainConfig
from dds.train.data import open_split
from dds.train.loop import run_train
from dds.workspace import Workspace, write_parquet

log = logging.getLogger(__name__)

# what run_bench returns per policy (the bench parquet adds bench_id, dataset, budget, seeds, model, train_s, eval_s)
ROW_KEYS = ("policy", "acc_mean", "acc_std", "budget_spent", "wall_ratio", "wall_ratio_eval", "select_s", "run_ids")


def run_bench(ws: Workspace, name: str, *, policies: list[str], budget: float, epochs: int, seeds: int,
              model: str = "resnet20", base_config: dict[str, Any] | None = None,
              policy_options: dict[str, dict[str, Any]] | None = None,
              progress: bool = True) -> list[dict[str, Any]]:
    """Train every policy with seeds 0..seeds-1 and summarise per policy.

    Args:
        ws: the workspace.
        name: the dataset.
        policies: policy names, e.g. ``["full", "random", "infobatch", "dds"]``.
        budget: fraction of full-data sample-steps for every policy (``full`` always spends 1).
        epochs: epochs per run.
        seeds: runs per policy (seeds ``0..seeds-1``, or ``base_config["seed"] + i``).
        model: model name for every run.
        base_config: further :class:`TrainConfig` fields shared by all runs (e.g. ``{"batch_size": 256}``,
            ``{"seed": 3}`` for seeds 3.., ``{"eval_split": "val"}``).
        policy_options: policy name -> its options (``{"dds": {"warmup_epochs": 0}}``); every key must be
            one of ``policies``.
        progress: tqdm bars while training.

    Returns:
        One dict per policy, in the given order: policy, acc_mean, acc_std (over seeds, ddof 0),
        budget_spent (mean fraction of full-data sample-steps used), wall_ratio (training
        wall-clock data+compute+select / full's), wall_ratio_eval (the same with evaluation
        included), select_s (mean selection seconds per run), run_ids. The bench parquet holds
        these (run_ids as a list) plus bench_id, dataset, budget, seeds, model, train_s and eval_s
        (mean seconds per run).

    Raises:
        DdsError: empty or duplicate policies, bad budget/epochs/seeds, or any error of run_train.
    """
    if not policies:
        raise DdsError("no policies given; try --policies full,random,infobatch,dds")
    if len(set(policies)) != len(policies):
        raise DdsError(f"policies listed twice in {','.join(policies)}; give each once")
    check_fraction("budget", budget)
    check_positive_int("epochs", epochs)
    check_positive_int("seeds", seeds)
    if from_env().enabled:
        raise DdsError("dds bench runs every policy in one process; start it without torchrun (dds train takes --nproc)")
    from dds.selector import get_policy

    options = dict(policy_options or {})
    stray = sorted(set(options) - set(policies))
    if stray:
        raise DdsError(f"options given for {', '.join(stray)}, which is not among the policies {','.join(policies)}")
    base = dict(base_config or {})
    seed0 = int(base.pop("seed", 0))
    # policies that ignore the budget (full) are run, and recorded, at budget 1; unknown names fail here
    budgets = {p: budget if getattr(get_policy(p), "uses_budget", True) else 1.0 for p in policies}
    configs = {p: [TrainConfig.from_dict({**base, "dataset": name, "policy": p, "budget": budgets[p],
                                          "epochs": epochs, "model": model, "seed": seed0 + s,
                                          "policy_options": options.get(p, {})}).validate()
                   for s in range(seeds)] for p in policies}
    first = configs[policies[0]][0]
    evaluated = open_split(ws, name, first.eval_split, cache=first.cache)  # a missing split fails before train decodes
    data = (open_split(ws, name, "train", cache=first.cache), evaluated)
    bench_id = f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
    results = {p: [run_train(ws, cfg, progress=progress, data=data) for cfg in configs[p]] for p in policies}
    rows = summarise(results)
    extra = {"bench_id": bench_id, "dataset": name, "budget": float(budget), "seeds": int(seeds), "model": model,
             "eval_split": first.eval_split}
    table = pa.Table.from_pylist([{**extra, **row} for row in rows])
    write_parquet(ws.root / "bench" / f"{bench_id}.parquet", table.cast(table.schema.set(
        table.schema.get_field_index("seeds"), pa.field("seeds", pa.int32()))))
    catalog.refresh(ws)
    log.info("bench %s written to %s", bench_id, ws.root / "bench" / f"{bench_id}.parquet")
    return [{k: row[k] for k in ROW_KEYS} for row in rows]


def summarise(results: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per-policy summary of run_train results (pure); ratios are relative to the ``full`` policy.

    Args:
        results: policy -> list of run_train result dicts (keys test_acc, budget_spent, data_s,
            compute_s, select_s, eval_s, run_id).
    """
    def mean(runs: list[dict[str, Any]], key: str) -> float:
        return float(np.mean([r[key] for r in runs]))

    train_s = {p: float(np.mean([r["data_s"] + r["compute_s"] + r["select_s"] for r in runs]))
               for p, runs in results.items()}
    eval_s = {p: mean(runs, "eval_s") for p, runs in results.items()}
    ref = results.get("full")
    if ref is None:
        log.warning("no 'full' policy in this bench: wall_ratio is NaN")
    rows = []
    for p, runs in results.items():
        accs = np.array([r["test_acc"] for r in runs], dtype=np.float64)
        ratio = train_s[p] / train_s["full"] if ref is not None and train_s["full"] > 0 else math.nan
        ratio_eval = ((train_s[p] + eval_s[p]) / (train_s["full"] + eval_s["full"])
                      if ref is not None and train_s["full"] + eval_s["full"] > 0 else math.nan)
        rows.append({"policy": p, "acc_mean": float(accs.mean()), "acc_std": float(accs.std()),
                     "budget_spent": mean(runs, "budget_spent"), "wall_ratio": ratio, "wall_ratio_eval": ratio_eval,
                     "select_s": mean(runs, "select_s"), "train_s": train_s[p], "eval_s": eval_s[p],
                     "run_ids": [r["run_id"] for r in runs]})
    return rows


def format_bench_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of bench rows (accuracy in %, mean ± std; ratios to full)."""
    header = ("policy", "accuracy %", "budget spent", "wall/full", "wall+eval/full", "select s")
    lines = [(r["policy"], f"{100 * r['acc_mean']:.2f} ± {100 * r['acc_std']:.2f}", f"{r['budget_spent']:.3f}",
              f"{r['wall_ratio']:.3f}", f"{r['wall_ratio_eval']:.3f}", f"{r['select_s']:.2f}") for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*ln) for ln in lines])
