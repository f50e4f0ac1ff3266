"""The ``dds bench*`` commands: :func:`register` adds them to the ``dds`` typer app.

Each command parses its options and calls one function of :mod:`dds.bench`; the implementations
(which import torch) are imported inside the commands, so ``dds --help`` stays fast.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dds._cli_shared import (AmpOpt, DeviceOpt, EncoderOpt, EvalSplitOpt, LabelSmoothingOpt, LrOpt, ModelOpt,
                             OptimizerOpt, ProgressOpt, WeightDecayOpt, WorkspaceOpt, _print_summary, _recipe,
                             _relaunch, _ws)
from dds.errors import DdsError
from dds.options import parse_policy_options
from dds.workspace import atomic_write_bytes


def bench(
    name: str = typer.Argument(..., help="Dataset name (as given to dds shard)."),
    policies: str = typer.Option("full,budgeted,random,infobatch,ucb,dds", "--policies",
                                 help="Comma-separated entries NAME[:KEY=VALUE...], e.g. "
                                      "full,budgeted,infobatch:prune_ratio=0.8,dds; 'full' is the reference."),
    budgets: str = typer.Option("0.5", "--budgets", "--budget", help="Comma-separated budgets (fractions of full-data "
                                "sample-steps) for the entries that follow one; full and fixed-ratio infobatch run once."),
    epochs: int = typer.Option(12, "--epochs", help="Training epochs per run."),
    seeds: int = typer.Option(3, "--seeds", help="Seeds per entry and budget (FIRST..FIRST+N-1)."),
    first_seed: int = typer.Option(0, "--first-seed", min=0, help="First seed."),
    model: str = ModelOpt,
    optimizer: str = OptimizerOpt,
    lr: Optional[float] = LrOpt,
    weight_decay: float = WeightDecayOpt,
    label_smoothing: float = LabelSmoothingOpt,
    option: list[str] = typer.Option([], "--option", "-o", help="Option of every entry of one policy, POLICY.KEY=VALUE "
                                                                "(repeatable), e.g. -o dds.warmup_epochs=0."),
    results: Optional[str] = typer.Option(None, "--results", help="Append one JSON line per run to this file "
                                                                  "(e.g. benchmarks/results/b1.jsonl)."),
    eval_every: int = typer.Option(1, "--eval-every", help="Evaluate every N epochs (and after the last); "
                                                           "a larger N saves evaluation time in long benches."),
    eval_split: str = EvalSplitOpt,
    encoder: str = EncoderOpt,
    device: str = DeviceOpt,
    amp: bool = AmpOpt,
    workspace: Optional[str] = WorkspaceOpt,
    progress: bool = ProgressOpt,
) -> None:
    """Run several policies x budgets x seeds on the same data and model; print and store one comparison table."""
    from dds._validate import check_device, check_positive_int
    from dds.bench.training import format_bench_table, run_bench

    check_positive_int("--epochs", epochs)
    check_positive_int("--seeds", seeds)
    check_device(device)
    names = [p.strip() for p in policies.split(",") if p.strip()]
    if not names:
        raise DdsError("--policies is empty; give e.g. --policies full,dds")
    try:
        budget_list = [float(b) for b in budgets.split(",") if b.strip()]
    except ValueError:
        raise DdsError(f"--budgets takes comma-separated numbers, got '{budgets}'") from None
    ws = _ws(workspace)
    per_policy = parse_policy_options(option)
    rows = run_bench(ws, name, policies=names, budgets=budget_list, epochs=epochs, seeds=seeds, model=model,
                     base_config={"encoder": encoder, "device": device, "seed": first_seed, "eval_split": eval_split,
                                  "eval_every": eval_every, "amp": amp,
                                  **_recipe(optimizer, lr, weight_decay, label_smoothing)},
                     policy_options=per_policy, progress=progress, results=results)
    typer.echo(format_bench_table(rows))
    typer.echo(f"accuracy: last epoch, on the {eval_split} split; lossless at = smallest spend with mean accuracy "
               "within 0.1 points of full")
    typer.echo("wall/full: each run against the full run nearest to it in the run order (rotated seed by seed), "
               "mean over seeds, min-max beside it")
    typer.echo(f"per-sample history: dds sql \"SELECT * FROM history WHERE run_id = '{rows[0]['run_ids'][0]}' LIMIT 10\""
               f" -w {ws.root}")
    typer.echo(f"model weights: {ws.root / 'runs'}/RUN_ID/checkpoint.pt, one per run (ids: dds sql \"SELECT run_id, "
               "policy, seed FROM runs\"); load with dds.train.load_trained (docs/training.md)")


def bench_table(
    files: list[str] = typer.Argument(None, help="JSON-lines files written by dds bench --results."),
    update: list[str] = typer.Option([], "--update", "-u", help="Markdown file whose <!-- bench-table FILES --> "
                                     "blocks are rebuilt from their results files (repeatable)."),
) -> None:
    """Markdown table of dds bench --results files; --update rebuilds the generated tables of a markdown file."""
    from dds.bench.training import read_results, regenerate_tables, table_from_results

    if not files and not update:
        raise DdsError("give results files to print, or --update DOC.md to rebuild a document's tables")
    if files:
        typer.echo(table_from_results(read_results([Path(f) for f in files])))
    for doc in map(Path, update):
        if not doc.is_file():
            raise DdsError(f"no markdown file {doc}")
        text = regenerate_tables(doc)
        changed = text != doc.read_text()
        if changed:
            atomic_write_bytes(doc, text.encode())
        typer.echo(f"{doc}: {'tables rebuilt' if changed else 'tables already up to date'}")


def bench_train(
    name: str = typer.Argument(..., help="Dataset name (as given to dds shard)."),
    model: str = typer.Option("resnet20", "--model", "-m", help="Model name."),
    batch_size: int = typer.Option(128, "--batch-size", "-b", help="Training batch size."),
    samples: int = typer.Option(4096, "--samples", help="Train samples per timed loop epoch."),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="--no-cache: also time the loop streaming from the "
                                                                "shards, next to the cached split."),
    prefetch: int = typer.Option(2, "--prefetch", help="Batches built ahead in the 'prefetch on' loop row."),
    decode_workers: int = typer.Option(1, "--decode-workers", help="With --no-cache: threads decoding the images "
                                                                   "(0 = in the thread reading the shards)."),
    repeats: int = typer.Option(2, "--repeats", help="Interleaved repeats of each measurement (best kept)."),
    bf16: bool = typer.Option(True, "--bf16/--no-bf16", help="Also time the bare step under bf16 autocast on cpu "
                                                             "(what the trainer uses on CPUs with AMX)."),
    results: Optional[str] = typer.Option(None, "--results", help="Append one JSON line per measurement row to this "
                                                                  "file, with the command and git commit."),
    device: str = DeviceOpt,
    workspace: Optional[str] = WorkspaceOpt,
) -> None:
    """Trainer img/s side by side in one process: bare model step (fp32/bf16, contiguous/channels_last) vs dds
    train's loop with prefetch off and on, and streamed with --no-cache (data wait = share of the loop's time
    spent waiting for batches)."""
    from dds.bench.training import bench_train as run

    ws = _ws(workspace)
    if results:
        ws.check_output(results, "--results")
    rows = run(ws, name, model=model, batch_size=batch_size, samples=samples, cache=cache, device=device,
               prefetch=prefetch, repeats=repeats, bf16=bf16, decode_workers=decode_workers)
    header = ("what", "channels_last", "bf16", "steps", "img/s", "data wait", "vs bare")

    def what(r) -> str:
        if r["what"] == "bare":
            return "bare step"
        workers = f", {decode_workers} decode threads" if r["source"] == "streamed" else ""
        return f"loop ({r['source']}{workers}), prefetch {r['prefetch'] or 'off'}"

    lines = [(what(r), str(r["channels_last"]), str(r["bf16"]), str(r["steps"]), f"{r['img_s']:.1f}",
              "-" if r["data_share"] is None else f"{100 * r['data_share']:.1f} %",
              "-" if r["vs_bare"] is None else f"{r['vs_bare']:.3f}") for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *lines)]
    for ln in [header, *lines]:
        typer.echo("  ".join(x.ljust(w) for x, w in zip(ln, widths)))
    if results:
        from dds.bench.training import append_results

        append_results(results, [{"dataset": name, "model": model, "batch_size": batch_size, **r} for r in rows])
    loops = {(r["source"], bool(r["prefetch"])): r["img_s"] for r in rows if r["what"] == "loop"}
    typer.echo(f"loop img/s, prefetch on / off: {loops[('cached', True)] / loops[('cached', False)]:.3f}   "
               "(vs bare: over the bare step with the trainer's settings)")
    if ("streamed", True) in loops:
        typer.echo(f"loop img/s, streamed / cached (prefetch on): {loops[('streamed', True)] / loops[('cached', True)]:.3f}")


def bench_embed(
    name: str = typer.Argument(..., help="Dataset name (as given to dds shard)."),
    encoder: str = EncoderOpt,
    batch_size: int = typer.Option(256, "--batch-size", "-b", help="Images per forward pass."),
    max_images: int = typer.Option(10000, "--max-images", help="Images to time in each of the two passes."),
    device: str = DeviceOpt,
    workspace: Optional[str] = WorkspaceOpt,
) -> None:
    """Embedding throughput: the full embed pipeline against the bare encoder forward pass, side by side."""
    from dds.bench.embed import bench_embed as _bench

    _print_summary("dds bench-embed", _bench(_ws(workspace), name, encoder=encoder, batch_size=batch_size,
                                             device=device, max_images=max_images))


def bench_plan(
    n: int = typer.Option(1_280_000, "--n", help="Samples (ImageNet-1k size by default)."),
    classes: int = typer.Option(1000, "--classes", help="Classes."),
    policy: str = typer.Option("dds", "--policy", help="Policy to time."),
) -> None:
    """Time planning one epoch on synthetic scores (target: <= 50 ms for 1.28M samples on CPU)."""
    from dds.bench.plan import bench_plan as _bench

    _print_summary("dds bench-plan", _bench(n=n, classes=classes, policy=policy))


def bench_index(
    n: int = typer.Option(100_000, "--n", help="Samples (1280000 for ImageNet-1k size)."),
    dim: int = typer.Option(512, "--dim", help="Embedding width."),
    classes: int = typer.Option(100, "--classes", help="Classes."),
    k: int = typer.Option(10, "--k", help="Neighbours per sample."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the synthetic data and of the stage."),
    adapters: str = typer.Option("auto", "--adapters", help="auto (as dds index decides for these aligned "
                                                            "synthetic towers, like CLIP's: zero-shot), on "
                                                            "(cross-fitted adapters, as for lite0-minilm) or off."),
    backend: str = typer.Option("auto", "--backend", help="kNN backend: auto (as dds index: exact up to 100k rows "
                                                          "per searched set, ivf above), torch, faiss (exact), ivf."),
    device: str = DeviceOpt,
) -> None:
    """Time dds index's compute on synthetic clustered embeddings by phase, with peak memory and the global graph's recall@k."""
    from dds._validate import check_choice, check_device
    from dds.device import resolve_device
    from dds.bench.index import bench_index as _bench

    check_choice("--adapters", adapters, ("auto", "on", "off"))
    check_device(device)
    _print_summary("dds bench-index", _bench(n=n, dim=dim, classes=classes, k=k, seed=seed,
                                             use_adapters=adapters == "on", backend=backend,
                                             device=str(resolve_device(device))))


def bench_dist(
    nproc: int = typer.Option(2, "--nproc", min=1, help="Processes (torchrun, gloo on CPU)."),
    n: int = typer.Option(1_280_000, "--n", help="Samples (ImageNet-1k size by default)."),
    classes: int = typer.Option(1000, "--classes", help="Classes."),
    policy: str = typer.Option("dds", "--policy", help="Policy to time."),
    repeats: int = typer.Option(5, "--repeats", min=1, help="Timed epochs (after one warm-up)."),
) -> None:
    """Time the distributed part of selection per epoch: plan check, per-rank split, loss gather (target: well under 1 s for 1.28M samples)."""
    _relaunch(nproc)
    from dds.bench.dist import bench_distributed

    _print_summary("dds bench-dist", bench_distributed(n=n, classes=classes, policy=policy, repeats=repeats))


def register(app: typer.Typer) -> None:
    """Add ``bench``, ``bench-table``, ``bench-train``, ``bench-embed``, ``bench-plan``, ``bench-index`` and
    ``bench-dist`` to ``app``."""
    for command in (bench, bench_table, bench_train, bench_embed, bench_plan, bench_index, bench_dist):
        app.command(command.__name__.replace("_", "-"))(command)
