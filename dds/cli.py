"""The `dds` command line: parses options, resolves the workspace, calls one library function per
command and prints the result. The library modules are imported inside the commands that use them:
through them torch and open_clip would add ~7 s to every start, `dds --help` included."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import sys
from pathlib import Path
from typing import Iterator, NoReturn, Optional

import typer

from dds._cli_shared import (AmpOpt, DeviceOpt, EncoderOpt, EvalSplitOpt, LabelSmoothingOpt, LrOpt, ModelOpt,
                             NprocOpt, OptimizerOpt, ProgressOpt, WeightDecayOpt, WorkspaceOpt, _print_grid,
                             _print_summary, _rank, _recipe, _relaunch, _ws)
from dds._validate import (check_choice, check_device, check_fraction, check_k_fits, check_min_int,
                           check_positive_int)
from dds.bench.cli import register as register_bench
from dds.errors import DdsError
from dds.options import parse_options
from dds.workspace import Workspace, write_parquet

app = typer.Typer(
    name="dds",
    help="Dynamic data selection meets data augmentation: shard, embed and index an image dataset, "
    "then train on a fraction of it, choosing every epoch which samples to train on and which to augment strongly.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _interrupted(message: str) -> NoReturn:
    """Say what Ctrl-C left behind in one line and exit with status 130."""
    global _INTERRUPT_TOLD
    _INTERRUPT_TOLD = True
    typer.echo(f"dds: interrupted; {message}", err=True)
    sys.exit(130)


#: whether a command already said what its interruption kept (else main() says the generic line)
_INTERRUPT_TOLD = False


@contextlib.contextmanager
def _on_interrupt(kept: str) -> Iterator[None]:
    """Ctrl-C inside the block: one line saying what was kept and how to go on (``kept``), exit status 130."""
    try:
        yield
    except KeyboardInterrupt:
        _interrupted(kept)


@app.command()
def shard(
    source: str = typer.Argument(..., help="A manifest name (fashion-mnist) or FILE.toml, imagefolder:PATH (one "
                                           "sub-folder per class, or train/ and test/ each with class folders), "
                                           "tar:GLOB (WebDataset shards with .cls labels), csv:FILE (path,label[,split]), "
                                           "torchvision:NAME:ROOT (local files, never downloaded) or hf-disk:PATH "
                                           "(a datasets save_to_disk folder). See docs/sources.md."),
    name: Optional[str] = typer.Option(None, "--name", "-n", help="Dataset name in the workspace [default: derived from SOURCE]."),
    split: Optional[str] = typer.Option(None, "--split", help="train or test [default: every split the source has]."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Keep a class-stratified subset of N samples per split."),
    val: Optional[int] = typer.Option(None, "--val", help="Carve a class-stratified 'val' split of N train samples "
                                                      "(outside --limit, true labels) to pick constants on instead of test."),
    shard_size: int = typer.Option(5000, "--shard-size", help="Samples per WebDataset tar."),
    label_noise: float = typer.Option(0.0, "--label-noise", help="Fraction of train labels to flip (true label kept in label_orig)."),
    noise_kind: str = typer.Option("symmetric", "--noise-kind", help="symmetric: round(F*N) flips, each to a uniformly "
                                   "drawn other class; pairflip: round(F*n_c) of each class c to (c+1) mod C; "
                                   "asymmetric: round(F*n_c) of each class along the manifest's noise_map."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed for --limit and --label-noise."),
    class_names: Optional[Path] = typer.Option(None, "--class-names", help="File naming the classes for text prompts "
                                               "('id name' or 'id,name' lines, or a JSON object), e.g. ImageNet "
                                               "synset -> name."),
    templates: Optional[Path] = typer.Option(None, "--templates", help="File of prompt templates, one per line, "
                                             "with {} for the class name (a prompt ensemble)."),
    overlap: str = typer.Option("drop", "--overlap", help="Test/val images that repeat a train image exactly: drop "
                                "(leave them out, listed in rejects) or keep. A split mostly made of train images "
                                "is refused either way."),
    workspace: Optional[str] = WorkspaceOpt,
    progress: bool = ProgressOpt,
) -> None:
    """Write SOURCE as WebDataset shards plus the samples, shards and rejects tables."""
    from dds.pipeline.shard import run_shard

    # run_shard checks every option (dds._validate) and that the workspace is writable
    with _on_interrupt("the dataset was left as it was (the half-written generation is discarded); run the "
                       "same dds shard command again"):
        summary = run_shard(Workspace.resolve(workspace), source, name=name, split=split, limit=limit, val=val,
                            shard_size=shard_size, label_noise=label_noise, noise_kind=noise_kind, seed=seed,
                            class_names=class_names, templates=templates, overlap=overlap, progress=progress)
    _print_summary(f"dds shard {source}", summary)


@app.command()
def embed(
    name: str = typer.Argument(..., help="Dataset name (as given to dds shard)."),
    encoder: str = EncoderOpt,
    batch_size: int = typer.Option(256, "--batch-size", "-b", help="Images per forward pass."),
    split: str = typer.Option("train", "--split", help="train, test or all."),
    workers: Optional[int] = typer.Option(None, "--workers", help="DataLoader decode workers [default: 1 on CPU, 4 on CUDA]."),
    nproc: int = NprocOpt,
    device: str = DeviceOpt,
    workspace: Optional[str] = WorkspaceOpt,
    progress: bool = ProgressOpt,
) -> None:
    """Embed every image (per shard, resumable) and every class prompt with ENCODER."""
    from dds.pipeline.embed import run_embed

    check_positive_int("--batch-size", batch_size)
    check_device(device)
    check_choice("--split", split, ("train", "test", "all"))
    splits = ("train", "test") if split == "all" else (split,)
    ws = _ws(workspace, write=True)
    ws.dataset_info(name)
    _relaunch(nproc)
    with _on_interrupt(f"the shards embedded so far are kept; run dds embed {name} again to embed the rest"):
        summary = run_embed(ws, name, encoder=encoder, batch_size=batch_size, splits=splits,
                            num_workers=workers, device=device, progress=progress)
    _print_summary(f"dds embed {name}", summary)


@app.command()
def index(
    name: str = typer.Argument(..., help="Dataset name (as given to dds shard)."),
    encoder: str = EncoderOpt,
    k: int = typer.Option(10, "--k", help="Neighbours per sample in the kNN graph."),
    adapters: str = typer.Option("auto", "--adapters", help="auto (on for unaligned towers, off for CLIP), on, off."),
    folds: int = typer.Option(5, "--folds", help="Cross-fitting folds for the adapters."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed for folds and adapter training."),
    backend: str = typer.Option("auto", "--backend", help="kNN search: auto (exact up to 100k rows per searched set "
                                                          "on CPU, 2M on CUDA; ivf above), torch, faiss (exact), ivf."),
    device: str = DeviceOpt,
    workspace: Optional[str] = WorkspaceOpt,
    progress: bool = ProgressOpt,
) -> None:
    """Build the kNN graph and per-sample scores (density, consistency, joint, region)."""
    from dds.pipeline.index import run_index
    from dds.pipeline.knn import BACKENDS

    check_positive_int("--k", k)
    check_choice("--adapters", adapters, ("auto", "on", "off"))
    check_choice("--backend", backend, BACKENDS)
    check_device(device)
    check_min_int("--folds", folds, 2, "cross-fitting")
    ws = _ws(workspace, write=True)
    classes = ws.dataset_info(name)["classes"]
    counts = ws.split_samples(name, "train", ["label"])["label"].value_counts()
    check_k_fits(k, {str(classes[int(c)]): int(n) for c, n in counts.items()})
    with _on_interrupt(f"the previous index of {name} ({encoder}), if any, is still the one in use; run dds "
                       f"index {name} again to rebuild it"):
        summary = run_index(ws, name, encoder=encoder, k=k, adapters=adapters, folds=folds, seed=seed,
                            device=device, backend=backend, progress=progress)
    _print_summary(f"dds index {name}", summary)
    _print_rows(ws, "SELECT region, count(*) AS n, round(avg(density), 3) AS density, "
                    "round(avg(consistency), 3) AS consistency, round(avg(joint), 3) AS joint, "
                    "round(avg(knn_agreement), 3) AS knn_agreement "
                    f"FROM scores WHERE dataset = '{_quote(name)}' AND encoder = '{_quote(encoder)}' "
                    "GROUP BY region ORDER BY n DESC",
                "scores by region")


def _quote(text: str) -> str:
    """``text`` safe inside a single-quoted SQL literal."""
    return text.replace("'", "''")


def _print_rows(ws: Workspace, sql: str, title: str | None = None, fmt: str = "table") -> None:
    """Print the result of each statement of ``sql`` (a blank line between two)."""
    from dds.catalog import query_all

    for i, table in enumerate(query_all(ws, sql)):
        if i:
            typer.echo("")
        _print_table(table, title, fmt)


def _print_table(table, title: str | None, fmt: str) -> None:
    if fmt == "json":
        typer.echo(json.dumps(table.to_pylist(), default=str, indent=1))
        return
    rows = [list(row.values()) for row in table.to_pylist()]
    if fmt == "csv":  # quoted only where CSV needs it, so `tail -1` of a one-column query is the bare value
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(table.column_names)
        writer.writerows([_csv_value(v) for v in row] for row in rows)
        typer.echo(buf.getvalue(), nl=False)
        return
    _print_grid(table.column_names, [["" if v is None else str(v) for v in row] for row in rows], title)


def _csv_value(v) -> str:
    """One CSV field: empty for NULL, true/false for booleans, lists and structs as JSON text."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, dict)):
        return json.dumps(v, default=str)
    return str(v)


@app.command()
def sql(
    query_text: str = typer.Argument(..., metavar="SQL", help="A read-only query over the catalog views: datasets, "
                                     "samples, shards, rejects, embeddings, text_embeddings, knn, scores, runs, "
                                     "epochs, history, bench."),
    fmt: str = typer.Option("table", "--format", "-f", help="table, csv or json."),
    workspace: Optional[str] = WorkspaceOpt,
) -> None:
    """Run a read-only SQL query over the workspace catalog."""
    check_choice("--format", fmt, ("table", "csv", "json"))
    _print_rows(_ws(workspace), query_text, fmt=fmt)


@app.command()
def train(
    name: str = typer.Argument(..., help="Dataset name (as given to dds shard); needs a train split and the "
                                         "--eval-split (test by default)."),
    policy: str = typer.Option("dds", "--policy", "-p", help="Selection policy: dds, full, budgeted, random, infobatch, ucb."),
    budget: float = typer.Option(0.5, "--budget", help="Fraction of full-data sample-steps the whole run may spend, "
                                                       "warm-up and annealing included."),
    epochs: int = typer.Option(12, "--epochs", help="Training epochs."),
    model: str = ModelOpt,
    seed: int = typer.Option(0, "--seed", help="Seed for the model, the selector and augmentation."),
    encoder: str = EncoderOpt,
    batch_size: int = typer.Option(128, "--batch-size", "-b", help="Training batch size."),
    optimizer: str = OptimizerOpt,
    lr: Optional[float] = LrOpt,
    weight_decay: float = WeightDecayOpt,
    label_smoothing: float = LabelSmoothingOpt,
    option: list[str] = typer.Option([], "--option", "-o", help="Policy option KEY=VALUE (repeatable), e.g. -o loss_weight=0.5."),
    eval_split: str = EvalSplitOpt,
    resume: Optional[str] = typer.Option(None, "--resume", help="Continue the run RUN_ID from its last checkpoint."),
    nproc: int = NprocOpt,
    device: str = DeviceOpt,
    amp: bool = AmpOpt,
    workspace: Optional[str] = WorkspaceOpt,
    progress: bool = ProgressOpt,
) -> None:
    """Train a classifier, choosing every epoch which samples to train on and how strongly to augment them."""
    ws = _ws(workspace)
    if resume:
        given = {"--policy": (policy, "dds"), "--budget": (budget, 0.5), "--epochs": (epochs, 12),
                 "--model": (model, "resnet20"), "--seed": (seed, 0), "--encoder": (encoder, "lite0-minilm"),
                 "--batch-size": (batch_size, 128), "--optimizer": (optimizer, "sgd"), "--lr": (lr, None),
                 "--weight-decay": (weight_decay, 5e-4), "--label-smoothing": (label_smoothing, 0.1),
                 "--option": (option, []),
                 "--eval-split": (eval_split, "test"), "--device": (device, "auto"), "--no-amp": (amp, True)}
        changed = [flag for flag, (value, default) in given.items() if value != default]
        if changed:
            raise DdsError(f"--resume continues a run with its saved options; drop {', '.join(changed)}")
    else:
        check_fraction("--budget", budget)
        check_positive_int("--epochs", epochs)
        check_positive_int("--batch-size", batch_size)
        check_device(device)
        if batch_size % nproc:
            raise DdsError(f"--batch-size {batch_size} is the global batch and must split evenly over --nproc {nproc}")
    _relaunch(nproc)
    from dds.train.config import TrainConfig
    from dds.train.loop import resume_train, run_train

    started: list[str] = []

    def announce(run_id: str) -> None:
        started.append(run_id)
        typer.echo(f"run {run_id} (if interrupted, resume with: dds train {name} --resume {run_id})", err=True)

    try:
        if resume:
            result = resume_train(ws, resume, progress=progress, dataset=name, announce=announce)
        else:
            cfg = TrainConfig(dataset=name, policy=policy, budget=budget, epochs=epochs, model=model, seed=seed,
                              encoder=encoder, batch_size=batch_size, device=device, eval_split=eval_split,
                              amp=amp, policy_options=parse_options(option),
                              **_recipe(optimizer, lr, weight_decay, label_smoothing))
            result = run_train(ws, cfg, progress=progress, announce=announce)
    except KeyboardInterrupt:
        if started:
            _interrupted(f"run {started[0]} is kept at its last finished epoch; resume with: "
                         f"dds train {name} --resume {started[0]}")
        if resume:
            _interrupted(f"run {resume} is unchanged (training had not begun); resume with: "
                         f"dds train {name} --resume {resume}")
        _interrupted("nothing was written (the run had not started); run the same command again")
    _print_summary("dds train", result)
    if _rank() == 0:
        typer.echo(f"model weights: {ws.run_dir(result['run_id']) / 'checkpoint.pt'} "
                   "(load with dds.train.load_trained; docs/training.md)")


@app.command()
def report(
    run_ids: list[str] = typer.Argument(..., metavar="RUN_ID...", help="Runs to show, or dds bench ids (all their "
                                        "runs, plus accuracy against budget): the curves show all, each policy "
                                        "the selection of its first run, the dataset part (examples, label "
                                        "issues) that of the dds run."),
    out: str = typer.Option("dds-report", "--out", "-o", help="Folder for the PNGs, label_issues.csv and index.html."),
    epoch: Optional[int] = typer.Option(None, "--epoch", help="Epoch whose selection the joint figures mark, "
                                        "0-based as in the epochs and history tables (default: each run's most "
                                        "selective one)."),
    per_region: int = typer.Option(8, "--per-region", help="Example images per region."),
    issues: int = typer.Option(24, "--issues", help="Rows of the label-issue gallery (and label_issues.csv)."),
    workspace: Optional[str] = WorkspaceOpt,
) -> None:
    """Write PNG figures and one self-contained HTML page (figures inlined) for one or more runs."""
    from dds.train.report import write_report

    check_positive_int("--per-region", per_region)
    check_positive_int("--issues", issues)
    result = write_report(_ws(workspace), run_ids, out, epoch=epoch, per_region=per_region, top_issues=issues)
    for note in result["notes"]:
        typer.echo(f"note: {note}")
    typer.echo(f"report: {result['html']} ({len(result['figures'])} figures)")


@app.command()
def audit(
    name: str = typer.Argument(..., help="Dataset name (as given to dds shard), indexed with ENCODER."),
    encoder: str = EncoderOpt,
    top: int = typer.Option(20, "--top", help="Most suspicious samples to print."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Write the whole ranking to this parquet file."),
    cleanlab: bool = typer.Option(True, "--cleanlab/--no-cleanlab", help="Compare with cleanlab's find_label_issues "
                                  "(optional dependency: pip install 'dds[audit]')."),
    workspace: Optional[str] = WorkspaceOpt,
) -> None:
    """Rank the samples most likely mislabelled; with injected noise, score the ranking (and cleanlab's)."""
    from dds.pipeline.audit import run_audit

    check_positive_int("--top", top)
    ws = _ws(workspace)
    if out:
        ws.check_output(out, "--out")
    result = run_audit(ws, name, encoder=encoder, use_cleanlab=cleanlab)
    _print_audit(result, top)
    if out:
        import pyarrow as pa   # 0.4 s: only when the ranking is written

        write_parquet(Path(out), pa.Table.from_pandas(result["ranking"], preserve_index=False))
        typer.echo(f"ranking written to {out}")


def _print_audit(result: dict, top: int) -> None:
    from dds.pipeline.audit import named_labels

    ranking = result["ranking"].head(top).copy()
    for c in ("label", "pred_label", "label_fixed"):   # "3 Dress": the number for dds sql, the name for people
        ranking[c] = named_labels(ranking[c].to_numpy(), result["classes"])
    cols = ["rank", "key", "label", "pred_label", "suspicion", "status", "label_fixed"] + \
        [c for c in ("noisy_truth", "cleanlab_flag") if ranking[c].notna().any()]
    typer.echo("most likely mislabelled (suspicion = 1 - posterior probability of the given label):")
    typer.echo(ranking[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    for what, m in result["metrics"].items():
        typer.echo(f"{what}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items()))
    for note in result["notes"]:
        typer.echo(f"note: {note}")


@app.command()
def export(
    run_id: str = typer.Argument(..., help="Run whose history and scores choose the subset."),
    budget: float = typer.Option(..., "--budget", help="Fraction F of the train samples to export, in (0, 1]: "
                                 "exactly round(F*N) samples."),
    out: str = typer.Option(..., "--out", "-o", help="Parquet file: key, label, weight, region, times_selected, mean_loss."),
    weights: str = typer.Option("uniform", "--weights", help="uniform (1) or class (N_c / n_c)."),
    shards: Optional[str] = typer.Option(None, "--shards", help="Also write the subset as WebDataset shards "
                                         "(plus the test tars) into this folder, for dds shard \"tar:DIR/*.tar\"."),
    shard_size: int = typer.Option(5000, "--shard-size", help="Samples per new tar."),
    workspace: Optional[str] = WorkspaceOpt,
) -> None:
    """Export a static, class-balanced coreset of a run's dataset (noisy region excluded) with weights."""
    from dds.train.export import run_export

    result = run_export(_ws(workspace), run_id, budget, out, weighting=weights, shards=shards, shard_size=shard_size)
    _print_summary(f"dds export {run_id}", result)


register_bench(app)


class _LogFormat(logging.Formatter):
    """Progress lines (INFO, shown when there are no bars) as the bare message; warnings and errors
    keep their level and logger."""

    def format(self, record: logging.LogRecord) -> str:
        return record.getMessage() if record.levelno == logging.INFO else super().format(record)


_GENERIC_INTERRUPT = ("every file is written whole or not at all, so nothing half-written was left; run the same "
                      "command again (dds train: --resume RUN_ID, see dds sql \"SELECT run_id, status FROM runs\")")


def main() -> None:
    """Console entry point: DdsError becomes one line on stderr and exit status 2."""
    # under torchrun the ranks log the same warnings: rank 0 shows them, the others only errors
    handler = logging.StreamHandler()
    handler.setFormatter(_LogFormat("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING if _rank() == 0 else logging.ERROR, handlers=[handler])
    try:
        app()
    except DdsError as e:
        typer.echo(f"dds: error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        _interrupted(_GENERIC_INTERRUPT)
    except SystemExit as e:  # typer turns a Ctrl-C outside the commands' own handlers into a silent exit 130
        if e.code == 130 and not _INTERRUPT_TOLD:
            _interrupted(_GENERIC_INTERRUPT)
        raise
    except Exception as e:  # an unexpected failure: one line, the traceback only on request
        if os.environ.get("DDS_DEBUG"):
            raise
        typer.echo(f"dds: error: {type(e).__name__}: {e} (set DDS_DEBUG=1 for the traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
