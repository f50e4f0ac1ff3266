"""``dds bench``: every policy x budget x seed in one process on the same decoded data; ``bench-table``
and ``bench-train``.

A bench entry is a policy name with optional options, ``NAME[:KEY=VALUE[:KEY=VALUE...]]`` (e.g.
``infobatch:prune_ratio=0.8``), so one policy can appear with several settings. Entries whose spend
follows ``--budget`` run once per budget; the others (``full``, fixed-ratio ``infobatch``) run once
and spend what they spend. ``full`` is the reference: wall-clock ratios are relative to it (NaN
without it) and each entry's *lossless budget* is the smallest spend whose mean accuracy is at
least full's mean minus 0.1 points.

Wall-clock ratios survive a machine that slows down over a long bench: the runs go seed by seed,
each seed's round rotated (:func:`run_order`), and every run is compared with the ``full`` run
nearest to it in the run order (:func:`nearest_runs`); an entry's ratio is the mean over its seeds,
printed with their min-max.

Rows go to ``bench/{bench_id}.parquet`` (catalog view ``bench``) and, with ``results=FILE``, one
JSON line per run is appended to FILE (command, git commit, entry, budget, seed, order, spend,
accuracy, seconds), the form in which benchmark results are committed to the repository.
"""
from __future__ import annotations

import datetime
import json
import logging
import math
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from dds import catalog
from dds._validate import check_positive_int
from dds.distributed import from_env
from dds.errors import DdsError
from dds.options import parse_entry
from dds.train.config import TrainConfig
from dds.device import amp_allowed, cpu_has_amx, resolve_device, uses_bf16
from dds.train.data import open_split
from dds.train.loop import run_train
from dds.workspace import Workspace, write_parquet

log = logging.getLogger(__name__)

LOSSLESS_TOL = 0.001  # lossless = mean accuracy >= full's mean - 0.1 points

# what run_bench returns per row (the bench parquet adds bench_id, dataset, seeds, model, eval_split, train_s, eval_s)
ROW_KEYS = ("policy", "budget", "acc_mean", "acc_std", "accs", "budget_spent", "wall_ratio", "wall_ratio_min",
            "wall_ratio_max", "wall_ratio_eval", "select_s", "lossless_budget", "run_ids", "orders")


def lossless_budget(points: list[tuple[float, float]], full_mean: float, tol: float = LOSSLESS_TOL) -> float | None:
    """The smallest spend whose mean accuracy is >= ``full_mean - tol``, or None if no point is lossless.

    Args:
        points: ``(budget_spent, acc_mean)`` of one entry at each budget it ran.
        full_mean: the ``full`` policy's mean accuracy.
    """
    ok = [spent for spent, acc in points if acc >= full_mean - tol - 1e-12]
    return min(ok) if ok else None


def run_bench(ws: Workspace, name: str, *, policies: list[str], budgets: list[float], epochs: int, seeds: int,
              model: str = "resnet20", base_config: dict[str, Any] | None = None,
              policy_options: dict[str, dict[str, Any]] | None = None, progress: bool = True,
              results: str | Path | None = None, command: str | None = None) -> list[dict[str, Any]]:
    """Train every entry x budget x seed and summarise per (entry, budget).

    Args:
        ws: the workspace.
        name: the dataset.
        policies: bench entries, e.g. ``["full", "budgeted", "random", "infobatch:prune_ratio=0.8", "dds"]``.
        budgets: budgets (fractions of full-data sample-steps) for the entries that follow a budget.
        epochs: epochs per run.
        seeds: runs per (entry, budget) (seeds ``0..seeds-1``, or ``base_config["seed"] + i``).
        model: model name for every run.
        base_config: further :class:`TrainConfig` fields shared by all runs (e.g. ``{"eval_split": "val"}``).
        policy_options: policy name -> options applied to every entry of that policy (entry options win).
        progress: tqdm bars while training.
        results: a JSON-lines file to append one row per run to.
        command: the command line recorded in ``results`` (default: ``sys.argv``).

    Returns:
        One dict per (entry, budget), entries in the given order, budgets ascending: policy (the
        entry), budget (None for entries that do not follow it), acc_mean, acc_std (ddof 0), accs
        (per seed), budget_spent (mean), wall_ratio (data+compute+select seconds / those of the
        nearest ``full`` run, mean over seeds), wall_ratio_min and wall_ratio_max (their spread),
        wall_ratio_eval (the same with evaluation), select_s, lossless_budget (per entry, the same
        on each of its rows; None when no budget is lossless or there is no ``full``), run_ids and
        orders (per seed: the run's 0-based place in the bench's run order, :func:`run_order`).

    Raises:
        DdsError: empty or duplicate entries, bad budgets/epochs/seeds, a ``results`` path inside the
            workspace's own files, or any error of run_train.
    """
    from dds.selector import get_policy
    from dds.selector._base import check_budget, make_config

    if not policies:
        raise DdsError("no policies given; try --policies full,budgeted,random,infobatch,dds")
    if len(set(policies)) != len(policies):
        raise DdsError(f"policies listed twice in {','.join(policies)}; give each once")
    if not budgets:
        raise DdsError("no budgets given; try --budgets 0.5")
    for b in budgets:
        check_budget(b)
    check_positive_int("epochs", epochs)
    check_positive_int("seeds", seeds)
    if results:   # before any training: never one of the workspace's own files
        ws.check_output(results, "--results")
    if from_env().enabled:
        raise DdsError("dds bench runs every policy in one process; start it without torchrun (dds train takes --nproc)")
    shared = dict(policy_options or {})
    parsed = {entry: parse_entry(entry) for entry in policies}
    stray = sorted(set(shared) - {p for p, _ in parsed.values()})
    if stray:
        raise DdsError(f"options given for {', '.join(stray)}, which is not among the policies {','.join(policies)}")
    base = dict(base_config or {})
    seed0 = int(base.pop("seed", 0))
    plan: list[tuple[str, float | None, list[TrainConfig]]] = []
    for entry, (policy, opts) in parsed.items():
        options = {**shared.get(policy, {}), **opts}
        cls = get_policy(policy)  # unknown names fail here, before any decoding
        follows = cls.follows_budget(make_config(policy, cls.Config, options))
        for b in (sorted(set(budgets)) if follows else [None]):
            cfgs = [TrainConfig.from_dict({**base, "dataset": name, "policy": policy, "budget": 1.0 if b is None else b,
                                           "epochs": epochs, "model": model, "seed": seed0 + s,
                                           "policy_options": options}).validate() for s in range(seeds)]
            plan.append((entry, b, cfgs))
    first = plan[0][2][0]
    workers = first.decode_workers
    evaluated = open_split(ws, name, first.eval_split, cache=first.cache, decode_workers=workers)  # fails before train decodes
    data = (open_split(ws, name, "train", cache=first.cache, decode_workers=workers), evaluated)
    bench_id = f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
    commit = _git_commit()
    command = command or " ".join(["dds", *sys.argv[1:]])
    done: list[list[dict[str, Any]]] = [[{} for _ in cfgs] for _, _, cfgs in plan]
    for order, (g, s) in enumerate(run_order(len(plan), seeds)):
        entry, b, cfgs = plan[g]
        cfg = cfgs[s]
        log.info("bench run %d of %d: %s%s, seed %d", order + 1, len(plan) * seeds, entry,
                 "" if b is None else f" at budget {b:g}", cfg.seed)
        r = run_train(ws, cfg, progress=progress, data=data)
        done[g][s] = {**r, "order": order}
        if results is not None:
            _append_jsonl(results, {"bench_id": bench_id, "command": command, "commit": commit, "dataset": name,
                                    "policy": entry, "budget": b, "epochs": epochs, "seed": cfg.seed, "order": order,
                                    "model": model, "eval_split": cfg.eval_split, "budget_spent": r["budget_spent"],
                                    "acc": r["test_acc"], "train_s": r["train_s"], "eval_s": r["eval_s"],
                                    "wall_s": r["wall_s"], "select_s": r["select_s"], "steps": r["steps"],
                                    "bf16": uses_bf16(resolve_device(cfg.device), cfg.amp), "run_id": r["run_id"]})
    runs = [(entry, b, out) for (entry, b, _), out in zip(plan, done)]
    rows = summarise(runs)
    extra = {"bench_id": bench_id, "dataset": name, "seeds": int(seeds), "model": model, "eval_split": first.eval_split}
    table = pa.Table.from_pylist([{**extra, **row} for row in rows], schema=_bench_schema(rows[0]))
    write_parquet(ws.root / "bench" / f"{bench_id}.parquet", table)
    catalog.refresh(ws)
    log.info("bench %s written to %s", bench_id, ws.root / "bench" / f"{bench_id}.parquet")
    return [{k: row[k] for k in ROW_KEYS} for row in rows]


def _bench_schema(row: dict[str, Any]) -> pa.Schema:
    types = {"bench_id": pa.string(), "dataset": pa.string(), "seeds": pa.int32(), "model": pa.string(),
             "eval_split": pa.string(), "policy": pa.string(), "budget": pa.float64(), "accs": pa.list_(pa.float64()),
             "lossless_budget": pa.float64(), "run_ids": pa.list_(pa.string()), "orders": pa.list_(pa.int32())}
    names = ["bench_id", "dataset", "seeds", "model", "eval_split", *row]
    return pa.schema([(k, types.get(k, pa.float64())) for k in dict.fromkeys(names)])


def run_order(groups: int, seeds: int) -> list[tuple[int, int]]:
    """``(group, seed)`` index pairs in the order a bench runs them: seed by seed, each seed's round of
    groups starting ``seed * groups // seeds`` groups further on.

    Rotating the rounds costs no extra run (timing ``full`` again at the end would cost the longest
    one) and puts every entry early in some rounds and late in others, so a machine that slows down
    over the bench does not favour the entries that happen to run first.
    """
    return [((s * groups // seeds + i) % groups, s) for s in range(seeds) for i in range(groups)]


def nearest_runs(order: int, refs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs of ``refs`` (each with an ``order``) nearest to position ``order`` in the run order:
    one, or the two on either side at the same distance."""
    gap = min(abs(r["order"] - order) for r in refs)
    return [r for r in refs if abs(r["order"] - order) == gap]


def _ratio(run: dict[str, Any], refs: list[dict[str, Any]], seconds: Callable[[dict[str, Any]], float]) -> float:
    """``seconds(run)`` over the mean ``seconds`` of the reference runs nearest to it (NaN without any)."""
    if not refs:
        return math.nan
    ref = float(np.mean([seconds(r) for r in nearest_runs(run["order"], refs)]))
    return seconds(run) / ref if ref > 0 else math.nan


def _train_s(r: dict[str, Any]) -> float:
    return r["data_s"] + r["compute_s"] + r["select_s"]


def summarise(runs: list[tuple[str, float | None, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Per-(entry, budget) summary of run_train results (pure); ratios and lossless budgets are
    relative to the entry named ``full``.

    Each run's wall ratio is taken against the ``full`` run(s) nearest to it in the run order
    (:func:`nearest_runs`); an entry's ``wall_ratio`` is the mean over its runs, ``wall_ratio_min``
    and ``wall_ratio_max`` their spread.

    Args:
        runs: ``(entry, budget or None, run_train results)`` per group; results carry test_acc,
            budget_spent, data_s, compute_s, select_s, eval_s, run_id and order (position in the run order).
    """
    full = [r for entry, _, results in runs if entry == "full" for r in results]
    if not full:
        log.warning("no 'full' policy in this bench: wall ratios and lossless budgets are not computed")
    rows = []
    for entry, b, results in runs:
        accs = [float(r["test_acc"]) for r in results]
        ratios = [_ratio(r, full, _train_s) for r in results]
        rows.append({"policy": entry, "budget": b, "acc_mean": float(np.mean(accs)), "acc_std": float(np.std(accs)),
                     "accs": accs, "budget_spent": float(np.mean([r["budget_spent"] for r in results])),
                     "train_s": float(np.mean([_train_s(r) for r in results])),
                     "eval_s": float(np.mean([r["eval_s"] for r in results])),
                     "select_s": float(np.mean([r["select_s"] for r in results])),
                     "wall_ratio": float(np.mean(ratios)), "wall_ratio_min": float(np.min(ratios)),
                     "wall_ratio_max": float(np.max(ratios)),
                     "wall_ratio_eval": float(np.mean([_ratio(r, full, lambda x: _train_s(x) + x["eval_s"])
                                                       for r in results])),
                     "run_ids": [r["run_id"] for r in results], "orders": [int(r["order"]) for r in results]})
    full_mean = float(np.mean([r["test_acc"] for r in full])) if full else None
    for row in rows:
        points = [(r["budget_spent"], r["acc_mean"]) for r in rows if r["policy"] == row["policy"]]
        row["lossless_budget"] = lossless_budget(points, full_mean) if full else None
    return rows


def format_bench_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of bench rows (accuracy in %, mean ± std; ratios to full with their min-max over
    seeds; lossless budget per entry; each seed's place in the run order)."""
    top = {}
    for r in rows:
        top[r["policy"]] = max(top.get(r["policy"], 0.0), r["budget_spent"])
    header = ("policy", "budget", "accuracy %", "spent", "wall/full", "min-max", "wall+eval/full", "select s",
              "lossless at", "run order")

    def lossless(r: dict[str, Any]) -> str:
        if r["policy"] == "full":
            return "-"
        return f"{r['lossless_budget']:.3f}" if r["lossless_budget"] is not None else f"> {top[r['policy']]:.2f}"

    lines = [(r["policy"], "-" if r["budget"] is None else f"{r['budget']:g}",
              f"{100 * r['acc_mean']:.2f} ± {100 * r['acc_std']:.2f}", f"{r['budget_spent']:.3f}",
              f"{r['wall_ratio']:.3f}", f"{r['wall_ratio_min']:.3f}-{r['wall_ratio_max']:.3f}",
              f"{r['wall_ratio_eval']:.3f}", f"{r['select_s']:.2f}", lossless(r), ",".join(map(str, r["orders"])))
             for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*ln) for ln in lines])


def table_from_results(lines: list[dict[str, Any]]) -> str:
    """A markdown table from ``--results`` JSON lines (the committed form), one row per dataset x
    entry x budget, so the README's tables can be regenerated from the files.

    Rows of the same (dataset, epochs, eval_split) are one comparison: wall ratios are taken within
    each bench against its own ``full`` runs (side by side in one process), the nearest in the run
    order for rows that record it (``order``; older rows: the mean of the bench's ``full`` runs), and
    averaged; the lossless budget compares with the mean of every ``full`` run of the comparison.
    """
    groups: dict[tuple, dict[tuple, list[dict[str, Any]]]] = {}
    for x in lines:
        key = (x["dataset"], x["epochs"], x.get("eval_split", "test"))
        groups.setdefault(key, {}).setdefault((x["policy"], x["budget"]), []).append(x)
    out = ["| dataset | epochs | policy | budget | runs | accuracy % (per run, by seed) | mean ± std | spent | wall/full | "
           "lossless at |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (dataset, epochs, split), entries in groups.items():
        full = entries.get(("full", None), [])
        full_mean = float(np.mean([x["acc"] for x in full])) if full else None
        full_runs: dict[str, list[dict[str, Any]]] = {}
        for x in full:
            full_runs.setdefault(x["bench_id"], []).append(x)
        points: dict[str, list[tuple[float, float]]] = {}
        for (policy, b), xs in entries.items():
            points.setdefault(policy, []).append((float(np.mean([x["budget_spent"] for x in xs])),
                                                  float(np.mean([x["acc"] for x in xs]))))
        for (policy, b), xs in entries.items():
            xs = sorted(xs, key=lambda x: x["seed"])
            accs = [100 * x["acc"] for x in xs]
            ratios = [_result_ratio(x, full_runs[x["bench_id"]]) for x in xs if x["bench_id"] in full_runs]
            lossless = "-"
            if full_mean is not None and policy != "full":
                lb = lossless_budget(points[policy], full_mean)
                lossless = f"{lb:.2f}" if lb is not None else f"> {max(p for p, _ in points[policy]):.2f}"
            out.append(f"| {dataset}{'' if split == 'test' else f' ({split})'} | {epochs} | {policy} | "
                       f"{'-' if b is None else f'{b:g}'} | {len(xs)} | {', '.join(f'{a:.2f}' for a in accs)} | "
                       f"{np.mean(accs):.2f} ± {np.std(accs):.2f} | {np.mean([x['budget_spent'] for x in xs]):.3f} | "
                       f"{f'{np.mean(ratios):.3f}' if ratios else 'n/a'} | {lossless} |")
    return "\n".join(out)


def _result_ratio(row: dict[str, Any], full: list[dict[str, Any]]) -> float:
    """A results row's train seconds over its bench's ``full`` runs': the nearest in the run order when
    the rows record it, else their mean."""
    if "order" in row and all("order" in f for f in full):
        return _ratio(row, full, lambda x: x["train_s"])
    return row["train_s"] / float(np.mean([f["train_s"] for f in full]))


def read_results(paths: list[Path]) -> list[dict[str, Any]]:
    """The rows of ``dds bench --results`` JSON-lines files.

    Raises:
        DdsError: a file is missing, is not JSON lines, or no file holds a row.
    """
    rows = []
    for path in paths:
        if not path.is_file():
            raise DdsError(f"no results file {path}; write one with dds bench NAME --results {path}")
        try:
            rows += [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        except json.JSONDecodeError as e:
            raise DdsError(f"{path} is not a JSON-lines file ({e})") from None
    if not rows:
        raise DdsError(f"{', '.join(map(str, paths))}: the results files hold no runs")
    return rows


#: a generated table in a markdown file: the files after ``bench-table`` are relative to that file's folder
TABLE_BLOCK = re.compile(r"(<!-- bench-table (?P<files>[^>]*?) -->\n)(?P<body>.*?)(<!-- /bench-table -->)", re.S)


def regenerate_tables(doc: Path) -> str:
    """The text of markdown file ``doc`` with every ``<!-- bench-table FILE... -->`` block rebuilt from its files."""
    def build(m: re.Match) -> str:
        paths = [doc.parent / f for f in m["files"].split()]
        return f"{m[1]}{table_from_results(read_results(paths))}\n{m[4]}"

    return TABLE_BLOCK.sub(build, doc.read_text())


def _git_commit() -> str | None:
    """The commit of the dds source tree, when it is a git checkout (else None); ``-dirty`` appended when
    tracked files differ from it, so a result row never claims a commit it was not measured on."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return (commit + "-dirty" if dirty else commit) or None


def append_results(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Append ``rows`` to the JSON-lines file ``path``, each with the command line and the git commit."""
    command, commit = " ".join(["dds", *sys.argv[1:]]), _git_commit()
    for row in rows:
        _append_jsonl(path, {"command": command, "commit": commit, **row})


def _append_jsonl(path: str | Path, row: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")


def bench_train(ws: Workspace, name: str, *, model: str = "resnet20", batch_size: int = 128, samples: int = 4096,
                cache: bool = True, device: str = "auto", repeats: int = 2, prefetch: int = 2,
                bf16: bool = True, decode_workers: int = 1) -> list[dict[str, Any]]:
    """Trainer throughput, side by side in one process: the bare step against ``dds train``'s epoch loop.

    * bare step: forward + backward + SGD step on one fixed batch already on the device, for each
      variant of memory format (contiguous / channels_last) and, on CPU (unless ``bf16`` is
      False), bf16 autocast; as many steps as the loop takes (at least 3). The CPU bf16 variants are
      measured once whatever ``repeats``; on a CPU without AMX, where they run several times slower
      and the trainer does not use them, with a quarter of the steps (at least 3);
    * loop: :func:`dds.train.loop.train_epoch` on a plan of ``samples`` train samples (base
      augmentation) with the trainer's own settings, once with batches built in the training
      thread (prefetch 0) and once with ``prefetch`` batches built ahead in a background thread, both
      on the split cached in RAM; with ``cache=False`` a third time, prefetching, streamed from the
      shards with the images decoded in ``decode_workers`` threads (``source`` ``streamed``);
      ``data_share`` is the share of the loop's time the training thread waited for batches.

    Every measurement runs ``repeats`` times, interleaved, after a warm-up (one step per bare variant,
    two batches of the loop); the best rate is kept.

    Returns:
        One dict per measurement: what ("bare" / "loop"), source (loop only: cached / streamed),
        channels_last, bf16, prefetch (loop only),
        steps, img_s, data_share (loop only), vs_bare (loop img/s over the bare step with the
        trainer's settings).
    """
    import torch
    import torch.nn.functional as F

    from dds.device import resolve_device
    from dds.selector._base import make_plan
    from dds.train.augment import Augmenter, channel_stats, normalize
    from dds.train.loop import _memory_format, train_epoch
    from dds.train.models import create_model

    check_positive_int("samples", samples)
    check_positive_int("batch_size", batch_size)
    check_positive_int("prefetch", prefetch)
    check_positive_int("repeats", repeats)
    dev = resolve_device(device)
    info = ws.dataset_info(name)
    train = open_split(ws, name, "train", cache=True)
    splits = {"cached": train}
    if not cache:
        splits["streamed"] = open_split(ws, name, "train", cache=False, decode_workers=decode_workers)
    m = min(samples, train.n)
    plan = make_plan(0, np.random.default_rng(0).permutation(train.n)[:m])
    cfgs = {(p, src): TrainConfig(dataset=name, model=model, batch_size=batch_size, epochs=1, device=device,
                                  cache=src == "cached", prefetch=p, decode_workers=decode_workers).validate()
            for src in splits for p in ((0, prefetch) if src == "cached" else (prefetch,))}
    cfg = cfgs[(0, "cached")]
    augmenter = Augmenter(train.image_size, train.channels)
    mean, std = channel_stats(train.mean, train.std, dev)
    first = next(iter(train.eval_batches(batch_size)))
    x0, y0 = normalize(first["image"].to(dev), mean, std), first["label"].to(dev)
    loop_steps = math.ceil(m / batch_size)

    def new_model(channels_last: bool):
        net = create_model(model, len(info["classes"]), int(info["channels"]), int(info["image_size"]))
        net.to(device=dev, memory_format=_memory_format(dev, channels_last))
        return net, torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True)

    def bare_steps(half: bool) -> int:
        full = max(3, loop_steps)
        return max(3, full // 4) if half and dev.type == "cpu" and not cpu_has_amx() else full

    def bare(channels_last: bool, half: bool) -> float:
        net, opt = new_model(channels_last)
        x = x0.contiguous(memory_format=_memory_format(dev, channels_last))

        def step():
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=half):
                logits = net(x)
            loss = F.cross_entropy(logits.float(), y0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        step()
        t0 = time.perf_counter()
        for _ in range(bare_steps(half)):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return bare_steps(half) * len(y0) / (time.perf_counter() - t0)

    def loop(key: tuple[int, str], epoch_plan=plan) -> tuple[float, float]:
        net, opt = new_model(cfg.channels_last)
        _, t = train_epoch(net, opt, splits[key[1]], epoch_plan, cfg=cfgs[key], device=dev, augmenter=augmenter,
                           steps_done=0, total_steps=10 ** 9, progress=False)
        spent = t["data_s"] + t["compute_s"]
        return len(epoch_plan.indices) / spent, t["data_s"] / spent

    mine = (cfg.channels_last and dev.type == "cpu", uses_bf16(dev, cfg.amp))  # the trainer's own settings
    bf16 = bf16 and amp_allowed()   # DDS_AMP=0: no bf16 variant either
    variants = [(True, False), (False, False)] + ([(True, True), (False, True)] if dev.type == "cpu" and bf16 else [])
    variants += [mine] if mine not in variants else []  # always measured: the loop's ratio is against it
    best: dict[Any, float] = {}
    share: dict[tuple[int, str], float] = {}
    loop((0, "cached"), make_plan(0, plan.indices[:2 * batch_size]))  # warm-up of the loop path (allocator, kernels)
    for r in range(repeats):
        for v in variants:
            if r == 0 or not v[1] or v == mine:  # bf16 variants the trainer does not use: once
                best[v] = max(best.get(v, 0.0), bare(*v))
        for key in cfgs:
            rate, s = loop(key)
            if rate > best.get(("loop", key), 0.0):
                best[("loop", key)], share[key] = rate, s
    ref = best[mine]
    rows = [{"what": "bare", "source": None, "channels_last": cl, "bf16": bf, "prefetch": None,
             "steps": bare_steps(bf), "img_s": round(best[(cl, bf)], 1), "data_share": None, "vs_bare": None}
            for cl, bf in variants]
    rows += [{"what": "loop", "source": key[1], "channels_last": mine[0], "bf16": mine[1], "prefetch": key[0],
              "steps": loop_steps, "img_s": round(best[("loop", key)], 1), "data_share": round(share[key], 3),
              "vs_bare": round(best[("loop", key)] / ref, 3)} for key in cfgs]
    return rows
