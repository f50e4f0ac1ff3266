"""Options and helpers shared by the command groups of the `dds` CLI (:mod:`dds.cli` and
:mod:`dds.bench.cli`), kept apart so that neither imports the other. The helpers keep their leading
underscore: they belong to the command line, not to the library."""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from dds._validate import check_choice
from dds.workspace import Workspace

WorkspaceOpt = typer.Option(None, "--workspace", "-w", envvar="DDS_WORKSPACE",
                            help="Workspace folder holding shards, embeddings, scores, runs and catalog.duckdb "
                                 "[default: ./dds-work].")
EncoderOpt = typer.Option("lite0-minilm", "--encoder", "-e",
                          help="Encoder name: lite0-minilm (offline pair), openclip:ARCH/PRETRAINED "
                               "(open_clip tag or local checkpoint), tiny-clip (random, for tests).")
DeviceOpt = typer.Option("auto", "--device", help="auto (cuda when present), cpu or cuda.")
NprocOpt = typer.Option(1, "--nproc", min=1, help="Processes on this machine: N > 1 runs this same command under "
                                                  "torchrun (one process per GPU with --device cuda, gloo on CPU).")


def _progress(flag: Optional[bool]) -> bool:
    """--progress/--no-progress as given, else bars only when stderr is a terminal.

    Without bars (a CI log, a file) the library's INFO lines take their place on the main rank: one
    per epoch, shard or stage, never a redraw.
    """
    bars = sys.stderr.isatty() if flag is None else flag
    if not bars and _rank() == 0:
        logging.getLogger("dds").setLevel(logging.INFO)
    return bars


ProgressOpt = typer.Option(None, "--progress/--no-progress", callback=_progress,
                           help="Progress bars [default: when stderr is a terminal; elsewhere plain log lines].")


def _ws(path: Optional[str], *, write: bool = False) -> Workspace:
    """The workspace: for readers it must exist; for writers it is created and must be writable."""
    ws = Workspace.resolve(path)
    return ws.check_writable() if write else ws.check_exists()


def _rank() -> int:
    """This process's rank under torchrun (0 outside it); read from the environment, no torch import."""
    return int(os.environ.get("RANK", "0") or 0)


def _relaunch(nproc: int) -> None:
    """With ``--nproc N > 1`` outside torchrun: run this same command under torchrun and exit with its code."""
    if nproc <= 1 or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        return
    argv, args = [], iter(sys.argv[1:])
    for a in args:
        if a == "--nproc":
            next(args, None)
        elif not a.startswith("--nproc="):
            argv.append(a)
    from dds.distributed import launch   # here: dds.distributed imports torch

    raise typer.Exit(launch(nproc, argv))


def _print_summary(title: str, summary: dict) -> None:
    if _rank() != 0:  # under torchrun the ranks' results are the same: rank 0 prints
        return
    _print_grid(None, [[str(k), v if isinstance(v, str) else json.dumps(v, default=str)] for k, v in summary.items()],
                title)


def _print_grid(header: list[str] | None, rows: list[list[str]], title: str | None) -> None:
    """Print ``rows`` of text as a table: never read as markup, never cut.

    A terminal gets a Rich table whose cells wrap; a pipe or a file gets aligned plain rows at full
    width (``header`` first when given), so ids and paths can be copied whole.
    """
    if sys.stdout.isatty():
        out = Table(title=Text(title) if title else None, show_header=header is not None)
        for name in header or (rows[0] if rows else []):
            out.add_column(Text(name) if header else None, overflow="fold")
        for row in rows:
            out.add_row(*(Text(v) for v in row))
        Console().print(out)
        return
    lines = ([header] if header is not None else []) + rows
    widths = [max(len(x) for x in col) for col in zip(*lines)]
    if title:
        typer.echo(title)
    for line in lines:
        typer.echo("  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip())


ModelOpt = typer.Option("resnet20", "--model", "-m", help="Model: resnet20, cnn3, resnet18, resnet50, or timm:NAME "
                                                          "(any timm architecture, random init, e.g. timm:convnext_atto).")
OptimizerOpt = typer.Option("sgd", "--optimizer", help="sgd (Nesterov momentum 0.9) or adamw.")
LrOpt = typer.Option(None, "--lr", help="Peak learning rate of the cosine schedule over the run's steps "
                                        "[default: 0.1 with sgd, 0.001 with adamw].")
WeightDecayOpt = typer.Option(5e-4, "--weight-decay", help="Weight decay on every parameter.")
LabelSmoothingOpt = typer.Option(0.1, "--label-smoothing", help="Cross-entropy label smoothing, in [0, 1).")


def _recipe(optimizer: str, lr: Optional[float], weight_decay: float, label_smoothing: float) -> dict:
    """The optimiser fields of a TrainConfig from the CLI options; --lr defaults by optimiser."""
    from dds.train.config import DEFAULT_LR   # in the command: dds.train imports torch

    check_choice("--optimizer", optimizer, tuple(DEFAULT_LR))
    return {"optimizer": optimizer, "lr": DEFAULT_LR[optimizer] if lr is None else lr,
            "weight_decay": weight_decay, "label_smoothing": label_smoothing}


EvalSplitOpt = typer.Option("test", "--eval-split", help="Split to evaluate every epoch: test, or val (made by "
                                                      "dds shard --val) to pick constants without touching test.")
AmpOpt = typer.Option(True, "--amp/--no-amp", help="bf16 autocast where it is fast (CUDA, or a CPU with "
                                                    "AMX); --no-amp trains in fp32 everywhere.")
