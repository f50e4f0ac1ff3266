"""``dds report``: PNG figures of one or more runs (or benches) and one self-contained HTML page.

The page (matplotlib, Agg backend) has a comparison of every run (``curves.png``; ``budget.png``
for a bench), one section per policy with its first run's selection figures, and the dataset of
the ``dds`` run (else the first run): region examples and the label-issue gallery, also written as
``label_issues.csv``. Each policy keeps one colour in every figure (:func:`policy_colors`); epochs
are 0-based, as in the tables; ``index.html`` embeds every image as a data URI so it opens offline.
Figure by figure: docs/report.md.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from matplotlib.colors import to_hex
from matplotlib.ticker import MaxNLocator
from PIL import Image

from dds.errors import DdsError
from dds.pipeline.audit import load_audit_inputs, suspicion, verdict_notes
from dds.shards import read_images
from dds.tables import (AUGMENT, KEEP, NOISY, REDUNDANT, REGIONS, RELABEL, STATUSES, SUPPRESS, check_run_data, load_epochs,
                        load_history, load_run, load_scores, load_train_samples, trained_rows)
from dds.workspace import Workspace, atomic_write_bytes, slug

log = logging.getLogger(__name__)

REGION_COLORS = {REGIONS[AUGMENT]: "tab:orange", REGIONS[KEEP]: "tab:green", REGIONS[REDUNDANT]: "tab:blue",
                 REGIONS[NOISY]: "tab:red"}
#: region -> (column, descending, what the grid shows)
EXAMPLE_RANKING = {REGIONS[AUGMENT]: ("joint", True, "highest joint (sparse and consistent)"),
                   REGIONS[KEEP]: ("prob_label", True, "most typical (highest prob_label)"),
                   REGIONS[REDUNDANT]: ("density", True, "most redundant (densest)"),
                   REGIONS[NOISY]: ("prob_label", False, "most suspicious labels (lowest prob_label)")}
#: the built-in policies keep these colours in every figure of every report
POLICY_COLORS = {"full": "black", "budgeted": "tab:gray", "random": "tab:blue", "infobatch": "tab:green",
                 "ucb": "tab:purple", "dds": "tab:red"}
SPARE_COLORS = ("tab:orange", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "gold", "navy", "teal", "maroon")
#: the columns of label_issues.csv (and the rows of the gallery)
ISSUE_COLUMNS = ("rank", "key", "source", "given_label", "given_class", "suggested_label", "suggested_class",
                 "label_posterior", "status")


# loading (I/O) lives in the core: dds.tables (runs, epochs, history, samples, scores), dds.shards (images)

# ---------------------------------------------------------------- pure cores

def budget_curve(sample_steps: np.ndarray, wall_s: np.ndarray, epochs: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative budget spent and wall-clock after each epoch.

    Args:
        sample_steps: (E,) int sample-steps of each epoch done.
        wall_s: (E,) float seconds of each epoch.
        epochs: the run's configured epochs; n: train samples N.

    Returns:
        ``(spent (E,) float64 = cumsum(sample_steps) / (epochs * n), wall (E,) float64 cumulative s)``.
    """
    return np.cumsum(sample_steps, dtype=np.float64) / float(epochs * n), np.cumsum(wall_s, dtype=np.float64)


def class_rates(epoch: np.ndarray, label: np.ndarray, selected: np.ndarray, strong: np.ndarray,
                num_epochs: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per epoch and class, the share of the class's samples selected and strongly augmented.

    Args:
        epoch: (R,) int epoch of each history row; label: (R,) int class of the row's sample.
        selected: (R,) bool; strong: (R,) bool (selected with strong augmentation).
        num_epochs: E; num_classes: C.

    Returns:
        ``(selected_rate, strong_rate)``, float64 ``(E, C)``; NaN where a class has no rows.
    """
    flat = np.asarray(epoch, np.int64) * num_classes + np.asarray(label, np.int64)
    size = num_epochs * num_classes
    total = np.bincount(flat, minlength=size).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        sel = np.bincount(flat, weights=np.asarray(selected, np.float64), minlength=size) / total
        stg = np.bincount(flat, weights=np.asarray(strong, np.float64), minlength=size) / total
    return sel.reshape(num_epochs, num_classes), stg.reshape(num_epochs, num_classes)


def suspects_by_epoch(epoch: np.ndarray, status: np.ndarray, flipped: np.ndarray | None,
                      fixed_right: np.ndarray | None, num_epochs: int) -> dict[str, np.ndarray]:
    """Per epoch: how many samples were relabelled and suppressed and, where the truth is known
    (noise injected by ``dds shard --label-noise``), how good that verdict was.

    Args:
        epoch: (R,) int epoch of each history row; status: (R,) str status of the row's sample.
        flipped: (R,) bool, the sample's given label differs from ``label_orig`` (None: no truth).
        fixed_right: (R,) bool, the sample's ``label_fixed`` equals ``label_orig`` (None: no truth).
        num_epochs: E.

    Returns:
        (E,) arrays ``relabel``, ``suppress`` (counts) and, with the truth, ``precision`` and
        ``recall`` of suspects (relabel or suppress) against the flips and ``relabel_acc``
        (relabelled samples whose corrected label is the true one); NaN where undefined.
    """
    ep = np.asarray(epoch, np.int64)
    relabel, suppress = status == STATUSES[RELABEL], status == STATUSES[SUPPRESS]
    out = {"relabel": np.bincount(ep, weights=relabel, minlength=num_epochs).astype(np.int64),
           "suppress": np.bincount(ep, weights=suppress, minlength=num_epochs).astype(np.int64)}
    if flipped is None:
        return out
    suspect = relabel | suppress

    def per_epoch(mask):
        return np.bincount(ep, weights=mask, minlength=num_epochs)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["precision"] = per_epoch(suspect & flipped) / per_epoch(suspect)
        out["recall"] = per_epoch(suspect & flipped) / per_epoch(flipped)
        out["relabel_acc"] = per_epoch(relabel & fixed_right) / per_epoch(relabel)
    return out


def pick_examples(region: np.ndarray, values: dict[str, np.ndarray], per_region: int) -> dict[str, np.ndarray]:
    """Row positions of the ``per_region`` samples that stand for each region (see ``EXAMPLE_RANKING``).

    Args:
        region: (N,) region names; values: column name -> (N,) float (joint, prob_label, density).
        per_region: samples per region.

    Returns:
        region -> int64 positions, best first, for the regions present (in ``EXAMPLE_RANKING`` order).
    """
    region = np.asarray(region).astype(str)
    out = {}
    for name, (column, descending, _) in EXAMPLE_RANKING.items():
        rows = np.flatnonzero(region == name)
        if rows.size == 0:
            continue
        v = np.asarray(values[column], np.float64)[rows]
        order = np.argsort(-v if descending else v, kind="stable")
        out[name] = rows[order[:per_region]]
    return out


def default_epoch(selected_per_epoch: np.ndarray) -> int:
    """The most selective epoch that trained on anything (fewest samples selected, the earliest on ties):
    ``budgeted`` ends with empty epochs, whose selection figure would show nothing."""
    sel = np.asarray(selected_per_epoch, dtype=float)
    return int(np.argmin(np.where(sel > 0, sel, np.inf))) if (sel > 0).any() else 0


def policy_colors(entries: list[str]) -> dict[str, str]:
    """One matplotlib colour per policy entry, used by every figure of a report.

    Built-in policies take their fixed ``POLICY_COLORS`` entry, so ``dds`` is the same colour in every
    report; other entries (``dds:strong_aug=top_q``) take ``SPARE_COLORS`` in order of appearance.
    """
    out: dict[str, str] = {}
    spare = 0
    for entry in dict.fromkeys(entries):
        if entry in POLICY_COLORS:
            out[entry] = POLICY_COLORS[entry]
        else:
            out[entry] = SPARE_COLORS[spare % len(SPARE_COLORS)]
            spare += 1
    return out


def label_issues(df, classes: list[str], top: int):
    """The ``top`` train samples most likely mislabelled, with the label the evidence suggests.

    Args:
        df: pandas rows of scores with ``key, source, label, pred_label, status, label_fixed,
            label_posterior`` (the verdict's probability that the given label is right).
        classes: class names by label.
        top: rows to keep.

    Returns:
        pandas rows with ``ISSUE_COLUMNS``, lowest ``label_posterior`` first (rank 1). The suggested
        label is the verdict's ``label_fixed`` where it corrects the label, else ``pred_label``.
    """
    order = np.argsort(-suspicion(df["label_posterior"].to_numpy()), kind="stable")[:top]
    rows = df.iloc[order].reset_index(drop=True)
    given = rows["label"].to_numpy(np.int64)
    fixed = rows["label_fixed"].to_numpy(np.int64)
    suggested = np.where(fixed != given, fixed, rows["pred_label"].to_numpy(np.int64))
    out = rows[["key", "source"]].copy()
    out.insert(0, "rank", np.arange(1, len(rows) + 1))
    out["given_label"], out["given_class"] = given, [str(classes[y]) for y in given]
    out["suggested_label"], out["suggested_class"] = suggested, [str(classes[y]) for y in suggested]
    out["label_posterior"] = rows["label_posterior"].to_numpy(np.float64)
    out["status"] = rows["status"].to_numpy()
    return out[list(ISSUE_COLUMNS)]


# ---------------------------------------------------------------- figures

def load_bench(ws: Workspace, bench_id: str):
    """The rows of ``bench/{bench_id}.parquet`` as a DataFrame, or None when there is no such bench."""
    path = ws.root / "bench" / f"{bench_id}.parquet"
    if "/" in bench_id or not path.is_file():
        return None
    return pq.read_table(path).to_pandas()


def _plt():
    # pyplot only when a figure is drawn: selecting the Agg backend is no side effect of importing this module
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _integer_ticks(ax) -> None:
    """Ticks on whole numbers only (epochs)."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def fig_joint(density: np.ndarray, consistency: np.ndarray, region: np.ndarray, selected: np.ndarray,
              strong: np.ndarray, *, epoch: int, max_points: int = 20000, seed: int = 0):
    """Density vs consistency: left coloured by region, right the chosen epoch's selection.

    Args:
        density, consistency: (N,) float; region: (N,) names; selected, strong: (N,) bool.
        epoch: the epoch shown (for the title); max_points: above this N a 2-D histogram of all
            samples is drawn behind a random subsample of ``max_points`` points.
    """
    plt = _plt()
    n = len(density)
    show = np.arange(n)
    if n > max_points:
        show = np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharex=True, sharey=True)
    for ax in axes:
        if n > max_points:
            ax.hist2d(density, consistency, bins=80, cmap="Greys", cmin=1)
        ax.set_xlabel("density (1 = densest of its class)")
    region = np.asarray(region).astype(str)
    for name, color in REGION_COLORS.items():
        rows = show[region[show] == name]
        axes[0].scatter(density[rows], consistency[rows], s=4, c=color, alpha=0.6, label=f"{name} ({(region == name).sum()})")
    axes[0].set_ylabel("consistency (image vs label prompt)")
    axes[0].set_title("joint distribution by region")
    axes[0].legend(markerscale=3, fontsize=8)
    axes[1].scatter(density[show], consistency[show], s=3, c="lightgrey", label="not selected")
    for mask, color, label in ((selected & ~strong, "tab:blue", "selected, base aug"),
                               (selected & strong, "tab:red", "selected, strong aug")):
        rows = show[mask[show]]
        axes[1].scatter(density[rows], consistency[rows], s=5, c=color, label=f"{label} ({int(mask.sum())})")
    axes[1].set_title(f"selection of epoch {epoch}")
    axes[1].legend(markerscale=3, fontsize=8)
    fig.tight_layout()
    return fig


def fig_curves(curves: list[dict[str, Any]], colors: dict[str, str]):
    """Learning curves, one line per run coloured by its policy entry: test accuracy (top) and train
    loss (bottom) against the epoch, the budget spent and the wall-clock.

    Args:
        curves: dicts with ``entry`` (policy entry) and (E,) arrays ``epoch``, ``spent``, ``wall``,
            ``acc``, ``loss`` (NaN where an epoch was not evaluated).
        colors: entry -> colour (:func:`policy_colors`).
    """
    plt = _plt()
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), sharex="col", sharey="row")  # one x range per column
    shown: set[str] = set()
    for c in curves:
        label = "_nolegend_" if c["entry"] in shown else c["entry"]   # one legend line per policy, seeds alike
        shown.add(c["entry"])
        for row, y in enumerate((100 * c["acc"], c["loss"])):
            ok = np.isfinite(y)
            for ax, x in zip(axes[row], (c["epoch"], c["spent"], c["wall"])):
                ax.plot(x[ok], y[ok], marker="o", ms=3, lw=1.2, color=colors[c["entry"]], label=label)
    for ax, xlabel in zip(axes[1], ("epoch (0-based, as in the epochs table)",
                                    "budget spent (fraction of full-data sample-steps)",
                                    "wall-clock (s, cumulative, evaluation included)")):
        ax.set_xlabel(xlabel)
    axes[0, 0].set_ylabel("test accuracy (%)")
    axes[1, 0].set_ylabel("train loss")
    for ax, title in zip(axes[0], ("accuracy per epoch", "accuracy vs budget", "accuracy vs wall-clock")):
        ax.set_title(title)
    axes[0, 2].legend(fontsize=8)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        _integer_ticks(ax)
    fig.tight_layout()
    return fig


def fig_budget(rows, colors: dict[str, str]) -> Any:
    """Final accuracy vs budget spent per bench entry; ``rows``: a bench table (policy, budget_spent,
    acc_mean, acc_std); the ``full`` row is drawn as a horizontal band of its mean ± std; ``colors``:
    entry -> colour (:func:`policy_colors`)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    full = rows[rows["policy"] == "full"]
    if len(full):
        m, sd = 100 * float(full["acc_mean"].iloc[0]), 100 * float(full["acc_std"].iloc[0])
        ax.axhspan(m - sd, m + sd, color="0.8", alpha=0.6, label=f"full {m:.2f} ± {sd:.2f}")
        ax.axhline(m, color=colors["full"], lw=1)
    for policy, g in rows[rows["policy"] != "full"].groupby("policy", sort=False):
        g = g.sort_values("budget_spent")
        ax.errorbar(g["budget_spent"], 100 * g["acc_mean"], yerr=100 * g["acc_std"], marker="o", ms=4, capsize=3,
                    color=colors[policy], label=policy)
    ax.set_xlabel("budget spent (fraction of full-data sample-steps)")
    ax.set_ylabel("accuracy (%), last epoch")
    ax.set_title("accuracy against budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def fig_class_rates(selected_rate: np.ndarray, strong_rate: np.ndarray, classes: list[str]):
    """Two heatmaps (epoch x class): share selected and share strongly augmented."""
    plt = _plt()
    e, c = selected_rate.shape
    fig, axes = plt.subplots(1, 2, figsize=(12, 1.5 + 0.35 * max(e, 4)))
    for ax, rate, title in ((axes[0], selected_rate, "selected"), (axes[1], strong_rate, "strongly augmented")):
        im = ax.imshow(rate, aspect="auto", vmin=0, vmax=1, cmap="viridis", origin="upper")
        ax.set_xticks(range(c), [str(x)[:10] for x in classes], rotation=45, ha="right", fontsize=7,
                      parse_math=False)  # class names are literal text: a '$' is not mathtext
        ax.set_yticks(range(e), [str(i) for i in range(e)], fontsize=7)
        ax.set_ylabel("epoch")
        ax.set_title(f"share of each class {title}")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def fig_suspects(rows: dict[str, np.ndarray]):
    """Suspects per epoch (counts) and, where the truth is known, precision / recall / relabel accuracy."""
    plt = _plt()
    quality = [k for k in ("precision", "recall", "relabel_acc") if k in rows]
    fig, axes = plt.subplots(1, 2 if quality else 1, figsize=(11 if quality else 5.5, 3.5), squeeze=False)
    x = np.arange(rows["relabel"].shape[0])
    for key in ("relabel", "suppress"):
        axes[0, 0].plot(x, rows[key], marker="o", label=key)
    axes[0, 0].set(xlabel="epoch", ylabel="samples", title="suspected labels")
    axes[0, 0].legend()
    for key in quality:
        axes[0, 1].plot(x, rows[key], marker="o", label=key)
    if quality:
        axes[0, 1].set(xlabel="epoch", ylim=(0, 1.02), title="against the injected flips")
        axes[0, 1].legend()
    for ax in axes.flat:
        _integer_ticks(ax)
    fig.tight_layout()
    return fig


def fig_examples(grid: dict[str, list[tuple[bytes, str]]]):
    """One row per region: its example images (PNG bytes) with a caption each."""
    plt = _plt()
    cols = max(len(v) for v in grid.values())
    fig, axes = plt.subplots(len(grid), cols, figsize=(1.4 * cols, 1.7 * len(grid)), squeeze=False)
    for r, (name, items) in enumerate(grid.items()):
        for j in range(cols):
            ax = axes[r, j]
            ax.axis("off")
            if j < len(items):
                with Image.open(io.BytesIO(items[j][0])) as im:
                    arr = np.asarray(im.convert("RGB"))
                ax.imshow(arr, cmap=None)
                ax.set_title(items[j][1], fontsize=6, parse_math=False)  # a class name, literally
        axes[r, 0].text(-0.15, 0.5, f"{name}\n{EXAMPLE_RANKING[name][2]}", transform=axes[r, 0].transAxes,
                        ha="right", va="center", fontsize=7)
    fig.tight_layout()
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    _plt().close(fig)
    return buf.getvalue()


# ---------------------------------------------------------------- the report

Figures = dict[str, tuple[bytes, str]]   # file stem -> (PNG bytes, caption)


def _entries(runs: list[dict[str, Any]], benches: list[Any]) -> dict[str, str]:
    """run id -> policy entry: the bench entry that ran it (``infobatch:prune_ratio=0.8``), else its policy."""
    entry = {r["run_id"]: r["policy"] for r in runs}
    for bench in benches:
        for policy, ids in zip(bench["policy"], bench["run_ids"]):
            entry.update(dict.fromkeys(ids, policy))
    return entry


def _curves(ws: Workspace, runs: list[dict[str, Any]], entry_of: dict[str, str]) -> list[dict[str, Any]]:
    curves, sizes = [], {}
    for run in runs:
        ep = load_epochs(ws, run["run_id"])
        if not len(ep):
            continue
        if run["dataset"] not in sizes:
            sizes[run["dataset"]] = len(load_train_samples(ws, run["dataset"]))
        spent, wall = budget_curve(ep["sample_steps"].to_numpy(), ep["wall_s"].to_numpy(), int(run["epochs"]),
                                   sizes[run["dataset"]])
        curves.append({"entry": entry_of[run["run_id"]], "epoch": ep["epoch"].to_numpy(np.int64), "spent": spent,
                       "wall": wall, "acc": ep["test_acc"].to_numpy(dtype=np.float64, na_value=np.nan),
                       "loss": ep["train_loss"].to_numpy(dtype=np.float64, na_value=np.nan)})
    return curves


def _selection_figures(ws: Workspace, run: dict[str, Any], entry: str, *, epoch: int | None, max_points: int,
                       notes: list[str]) -> Figures:
    """joint, class_rates and (with a label verdict) suspects figures of one run; stems start with the entry."""
    dataset, encoder, run_id = run["dataset"], run["config"].get("encoder", "lite0-minilm"), run["run_id"]
    hist = load_history(ws, run_id)
    if not len(hist):
        notes.append(f"run {run_id} has no epochs yet: no selection figures")
        return {}
    hist["selected"] = trained_rows(hist)   # dds's held-out probes (weight 0) were measured, not trained
    if hist["selected"].all():
        notes.append(f"run {run_id} trains on every sample every epoch: no selection figures")
        return {}
    epochs_done = int(hist["epoch"].max()) + 1
    if epoch is None:
        epoch = default_epoch(hist.groupby("epoch")["selected"].sum().reindex(range(epochs_done), fill_value=0).to_numpy())
    elif not 0 <= epoch < epochs_done:
        raise DdsError(f"--epoch must be in [0, {epochs_done - 1}] for run {run_id} (0-based, as in the epochs "
                       f"table), got {epoch}")
    samples = load_train_samples(ws, dataset)
    classes = ws.dataset_info(dataset)["classes"]
    hist = hist.merge(samples[["key", "label"]], on="key", how="inner")
    hist["strong"] = hist["selected"] & (hist["aug"] == "strong")
    sel_rate, strong_rate = class_rates(hist["epoch"].to_numpy(), hist["label"].to_numpy(), hist["selected"].to_numpy(),
                                        hist["strong"].to_numpy(), epochs_done, len(classes))
    prefix, figs = slug(entry), {}
    scores = load_scores(ws, dataset, encoder)
    if scores is None:
        notes.append(f"no scores for {dataset} under encoder {encoder}: no joint figure "
                     f"(run `dds index {dataset} --encoder {encoder}`)")
    else:
        one = scores.merge(hist.loc[hist["epoch"] == epoch, ["key", "selected", "strong"]], on="key", how="left")
        one[["selected", "strong"]] = one[["selected", "strong"]].fillna(False).astype(bool)
        figs[f"{prefix}-joint"] = (
            _png(fig_joint(one["density"].to_numpy(), one["consistency"].to_numpy(), one["region"].to_numpy(),
                           one["selected"].to_numpy(), one["strong"].to_numpy(), epoch=epoch, max_points=max_points)),
            f"Density vs consistency ({encoder}) by region, and the selection of epoch {epoch} ({run_id}).")
    figs[f"{prefix}-class_rates"] = (_png(fig_class_rates(sel_rate, strong_rate, classes)),
                                     f"Per-class share selected and strongly augmented, per epoch ({run_id}).")
    if hist["status"].notna().any():   # the selector kept a label verdict
        figs[f"{prefix}-suspects"] = _suspects_figure(hist[["epoch", "key", "status"]], samples, scores, epochs_done,
                                                      run_id, notes)
    return figs


def _suspects_figure(status, samples, scores, epochs_done: int, run_id: str, notes: list[str]) -> tuple[bytes, str]:
    """The suspects figure of a run from its (epoch, key, status) history rows; appends a note."""
    rows = status.merge(samples[["key", "label", "label_orig"]], on="key", how="inner")
    flipped = fixed_right = None
    if (rows["label"] != rows["label_orig"]).any():   # noise was injected: the truth is known
        flipped = (rows["label"] != rows["label_orig"]).to_numpy()
        fixed = rows.merge(scores[["key", "label_fixed"]], on="key", how="left")["label_fixed"] if scores is not None \
            and "label_fixed" in scores else rows["label"]
        fixed_right = (fixed.to_numpy() == rows["label_orig"].to_numpy())
    out = suspects_by_epoch(rows["epoch"].to_numpy(), rows["status"].to_numpy(), flipped, fixed_right, epochs_done)
    last = {k: v[-1] for k, v in out.items()}
    text = f"last epoch: {last['relabel']} relabelled, {last['suppress']} suppressed"
    if flipped is not None:
        text += (f"; against the injected flips: precision {last['precision']:.3f}, recall {last['recall']:.3f}, "
                 f"relabel accuracy {last['relabel_acc']:.3f}")
    notes.append(f"run {run_id}, {text}")
    return _png(fig_suspects(out)), f"Suspected labels per epoch ({run_id}); {text}."


def _sources(ws: Workspace, dataset: str):
    """key -> source (the file or archive member a train sample came from; empty in tables that predate it)."""
    if "source" in pq.read_schema(ws.dataset_dir(dataset) / "samples.parquet").names:
        return ws.split_samples(dataset, "train", ["key", "source"])[["key", "source"]]
    return pd.DataFrame({"key": load_train_samples(ws, dataset)["key"], "source": ""})


def _dataset_part(ws: Workspace, run: dict[str, Any], *, per_region: int, top: int, notes: list[str]):
    """The examples figure and the label issues (rows, thumbnails) of the run's dataset under its encoder.

    Returns:
        ``(figures, issues (pandas with ISSUE_COLUMNS) or None, {key: PNG bytes})``.
    """
    dataset, encoder = run["dataset"], run["config"].get("encoder", "lite0-minilm")
    scores = load_scores(ws, dataset, encoder)
    if scores is None:
        notes.append(f"no scores for {dataset} under encoder {encoder}: no examples and no label issues "
                     f"(run `dds index {dataset} --encoder {encoder}`)")
        return {}, None, {}
    classes = ws.dataset_info(dataset)["classes"]
    issues = None
    skipped = verdict_notes(ws, dataset, encoder)
    if skipped:
        notes.extend(f"{n}: no label issues" for n in skipped)
    elif {"pred_label", "probs"} <= set(scores.columns):
        verdict = load_audit_inputs(ws, dataset, encoder).merge(_sources(ws, dataset), on="key", how="left")
        issues = label_issues(verdict.fillna({"source": ""}), classes, top)
    else:
        notes.append(f"the scores of {dataset} under {encoder} carry no class probabilities: no label issues "
                     f"(run `dds index {dataset} --encoder {encoder}` again)")
    picks = pick_examples(scores["region"].to_numpy(), {c: scores[c].to_numpy() for c in ("joint", "prob_label", "density")},
                          per_region)
    keys = [k for rows in picks.values() for k in scores["key"].to_numpy()[rows]]
    images = read_images(ws, dataset, keys + ([] if issues is None else list(issues["key"])),
                         load_train_samples(ws, dataset))
    grid = {name: [(images[scores["key"].iat[i]], f"{str(classes[scores['label'].iat[i]])[:12]} "
                                                  f"p={scores['prob_label'].iat[i]:.2f}")
                   for i in rows if scores["key"].iat[i] in images] for name, rows in picks.items()}
    grid = {k: v for k, v in grid.items() if v}
    figs = {"examples": (_png(fig_examples(grid)), "Example images per region (given label, prob_label).")} if grid else {}
    return figs, issues, images


def _issues_csv(issues) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(ISSUE_COLUMNS)
    for row in issues.itertuples(index=False):
        writer.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row])
    return buf.getvalue().encode("utf-8")


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _gallery_html(issues, images: dict[str, bytes], csv_name: str) -> str:
    """The label-issue table: rank, thumbnail, given -> suggested class, posterior, status, key and source."""
    esc = html.escape
    rows = []
    for r in issues.itertuples(index=False):
        png = images.get(r.key)
        img = f"<img class='thumb' alt='{esc(r.key)}' src='{_data_uri(png)}'>" if png else ""
        change = (f"{esc(r.given_class)} &rarr; <b>{esc(r.suggested_class)}</b>" if r.suggested_label != r.given_label
                  else f"{esc(r.given_class)} (no other label suggested)")
        rows.append(f"<tr><td>{r.rank}</td><td>{img}</td><td>{change}</td><td>{r.label_posterior:.2g}</td>"
                    f"<td>{esc(str(r.status))}</td><td><code>{esc(r.key)}</code><br><small>{esc(str(r.source))}</small>"
                    "</td></tr>")
    return ("<h3>label issues</h3><p>The train samples most likely mislabelled: lowest posterior probability that "
            "the given label is right first; the suggested label is the verdict's correction, else the class the "
            f"evidence prefers. The same rows: <a href='{csv_name}'>{csv_name}</a>.</p><table class='issues'><tr>"
            "<th>#</th><th>image</th><th>given &rarr; suggested</th><th>P(given)</th><th>status</th>"
            "<th>key / source</th></tr>" + "".join(rows) + "</table>")


def _html(runs: list[dict[str, Any]], entry_of: dict[str, str], colors: dict[str, str],
          sections: list[dict[str, Any]]) -> str:
    cols = ("run_id", "dataset", "policy", "seed", "budget", "budget_spent", "test_acc", "epochs_done", "wall_s", "status")
    esc = html.escape

    def cell(run: dict[str, Any], c: str) -> str:
        if c != "policy":
            return esc(_fmt(run.get(c)))
        entry = entry_of[run["run_id"]]
        return f"<span class='swatch' style='background:{to_hex(colors[entry])}'></span>{esc(entry)}"
    rows = "".join("<tr>" + "".join(f"<td>{cell(r, c)}</td>" for c in cols) + "</tr>" for r in runs)
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>dds report</title>",
             "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;border-bottom:1px solid #ddd;"
             "text-align:left}img{max-width:100%}img.thumb{width:56px;image-rendering:pixelated}"
             ".swatch{display:inline-block;width:.8em;height:.8em;margin-right:.4em}</style></head><body>"
             "<h1>dds report</h1><p>Epochs are 0-based, as in the epochs and history tables.</p>",
             "<table><tr>" + "".join(f"<th>{c}</th>" for c in cols) + f"</tr>{rows}</table>"]
    for sec in sections:
        parts.append(f"<h2>{esc(sec['title'])}</h2>")
        parts += [f"<p><em>{esc(n)}</em></p>" for n in sec["notes"]]
        for name, (png, caption) in sec["figures"].items():
            parts.append(f"<h3>{esc(name)}</h3><p>{esc(caption)}</p><img alt='{esc(name)}' src='{_data_uri(png)}'>")
        parts.append(sec.get("html", ""))
    return "\n".join(parts + ["</body></html>"])


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_report(ws: Workspace, run_ids: list[str], out: str | Path, *, epoch: int | None = None,
                 per_region: int = 8, top_issues: int = 24, max_points: int = 20000) -> dict[str, Any]:
    """Write the figures of ``run_ids`` as PNGs, ``label_issues.csv`` and ``index.html`` into ``out``.

    Args:
        ws: the workspace.
        run_ids: runs to show, or ``dds bench`` ids (each stands for all its runs and adds the
            accuracy-against-budget figure). The curves show every run; each policy entry gets a
            section with the selection figures of its first run; the dataset part (examples, label
            issues) is that of the first ``dds`` run, else of the first run.
        out: output folder (created).
        epoch: 0-based epoch whose selection the joint figures mark [default: each run's most selective].
        per_region: example images per region.
        top_issues: rows of the label-issue gallery and CSV.
        max_points: above this many samples the joint figure draws a 2-D histogram behind a subsample.

    Returns:
        {"html": path, "figures": [PNG paths], "csv": path of label_issues.csv or None,
        "notes": [what was skipped and why]}.

    Raises:
        DdsError: no run ids, an unknown run id, ``epoch`` outside a shown run's epochs, a run whose
            dataset or index was replaced since it trained, or ``out`` inside the workspace's own files.
    """
    if not run_ids:
        raise DdsError("no run ids given; list them with: dds sql \"SELECT run_id, policy, status FROM runs\"")
    benches, expanded = [], []
    for r in run_ids:
        bench = load_bench(ws, r)
        if bench is None:
            expanded.append(r)
        else:
            benches.append(bench)
            expanded += [x for ids in bench["run_ids"] for x in ids]
    runs = [load_run(ws, r) for r in dict.fromkeys(expanded)]
    for run in runs:  # the figures read each run's dataset and scores
        check_run_data(ws, run)
    out = ws.check_output(out, "--out")
    entry_of = _entries(runs, benches)
    colors = policy_colors([entry_of[r["run_id"]] for r in runs])
    comparison: Figures = {}
    for i, bench in enumerate(benches):
        comparison[f"budget{i or ''}"] = (_png(fig_budget(bench, colors)), f"Bench {bench['bench_id'].iloc[0]}: final "
                                          "accuracy against budget spent per entry (mean ± std over seeds); full as a band.")
    curves = _curves(ws, runs, entry_of)
    if curves:
        comparison["curves"] = (_png(fig_curves(curves, colors)), "Learning curves of every run: test accuracy and "
                                "train loss per epoch, against the epoch, the budget spent and the wall-clock.")
    sections = [{"title": "comparison", "figures": comparison, "notes": []}]
    first_of: dict[str, dict[str, Any]] = {}
    for run in runs:
        first_of.setdefault(entry_of[run["run_id"]], run)
    for entry, run in first_of.items():
        notes: list[str] = []
        figs = _selection_figures(ws, run, entry, epoch=epoch, max_points=max_points, notes=notes)
        sections.append({"title": f"policy {entry}", "figures": figs, "notes": notes})
    main = next((r for r in runs if r["policy"] == "dds"), runs[0])
    notes = []
    figs, issues, images = _dataset_part(ws, main, per_region=per_region, top=top_issues, notes=notes)
    csv_path = None if issues is None else out / "label_issues.csv"
    sections.append({"title": f"dataset {main['dataset']}", "figures": figs, "notes": notes,
                     "html": "" if issues is None else _gallery_html(issues, images, csv_path.name)})
    paths = []
    for sec in sections:
        for name, (png, _) in sec["figures"].items():
            atomic_write_bytes(out / f"{name}.png", png)
            paths.append(str(out / f"{name}.png"))
    if csv_path is not None:
        atomic_write_bytes(csv_path, _issues_csv(issues))
    atomic_write_bytes(out / "index.html", _html(runs, entry_of, colors, sections).encode("utf-8"))
    log.info("report of %d run(s) written to %s", len(runs), out)
    return {"html": str(out / "index.html"), "figures": paths, "csv": None if csv_path is None else str(csv_path),
            "notes": [n for sec in sections for n in sec["notes"]]}
