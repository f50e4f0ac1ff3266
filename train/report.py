"""``dds report``: PNG figures of one or more runs and one self-contained HTML page.

Figures (matplotlib, Agg backend; each also written as a PNG next to ``index.html``):

* ``joint.png``: density vs consistency of every train sample, coloured by region (a 2-D histogram
  behind a subsample when N is large), and, on the same axes, the samples the first run selected in
  the chosen epoch, base and strong augmentation marked apart. Needs the scores of the run's encoder.
* ``curves.png``: test accuracy against the budget spent so far (cumulative sample-steps over
  epochs x N) and against the cumulative wall-clock, one line per run.
* ``budget.png`` (when a ``dds bench`` id is given): final accuracy against the budget spent, one
  line per bench entry (mean ± std over seeds at each budget), ``full`` as a horizontal band (mean ± std).
* ``class_rates.png``: per class and epoch, the share of the class's samples selected and the share
  strongly augmented (first run).
* ``examples.png``: per region, the samples that stand for it: ``augment`` the highest ``joint``,
  ``keep`` the most typical (highest ``prob_label``), ``redundant`` the densest, ``noisy`` the most
  suspicious labels (lowest ``prob_label``), each titled with its given label.

``index.html`` embeds every PNG as a base64 data URI, so the page alone opens offline anywhere.
"""
from __future__ import annotations

import base64
import difflib
import html
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np

from dds.errors import DdsError
from dds.shards import read_images
from dds.tables import load_epochs, load_history, load_run, load_scores, load_train_samples
from dds.workspace import Workspace

log = logging.getLogger(__name__)

REGION_COLORS = {"augment": "tab:orange", "keep": "tab:green", "redundant": "tab:blue", "noisy": "tab:red"}
#: region -> (column, descending, what the grid shows)
EXAMPLE_RANKING = {"augment": ("joint", True, "highest joint (sparse and consistent)"),
                   "keep": ("prob_label", True, "most typical (highest prob_label)"),
                   "redundant": ("density", True, "most redundant (densest)"),
                   "noisy": ("prob_label", False, "most suspicious labels (lowest prob_label)")}


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
    relabel, suppress = status == "relabel", status == "suppress"
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
    """The most selective epoch (fewest samples selected; the earliest on ties)."""
    return int(np.argmin(np.asarray(selected_per_epoch)))


# ---------------------------------------------------------------- figures

def load_bench(ws: Workspace, bench_id: str):
    """The rows of ``bench/{bench_id}.parquet`` as a DataFrame, or None when there is no such bench."""
    import pyarrow.parquet as pq

    path = ws.root / "bench" / f"{bench_id}.parquet"
    if "/" in bench_id or not path.is_file():
        return None
    return pq.read_table(path).to_pandas()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
    axes[1].set_title(f"selection of epoch {epoch + 1}")
    axes[1].legend(markerscale=3, fontsize=8)
    fig.tight_layout()
    return fig


def fig_curves(curves: list[dict[str, Any]]):
    """Accuracy vs budget spent and vs wall-clock; ``curves``: dicts label, policy, spent, wall, acc (arrays)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    policies = sorted({c["policy"] for c in curves})
    colors = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(policies)}
    for c in curves:
        ok = np.isfinite(c["acc"])
        for ax, x in zip(axes, (c["spent"], c["wall"])):
            ax.plot(x[ok], 100 * c["acc"][ok], marker="o", ms=3, color=colors[c["policy"]], label=c["label"])
    axes[0].set_xlabel("budget spent (fraction of full-data sample-steps)")
    axes[1].set_xlabel("wall-clock (s, cumulative, evaluation included)")
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].set_title("accuracy vs budget")
    axes[1].set_title("accuracy vs wall-clock")
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def fig_budget(rows) -> Any:
    """Final accuracy vs budget spent per bench entry; ``rows``: a bench table (policy, budget_spent,
    acc_mean, acc_std); the ``full`` row is drawn as a horizontal band of its mean ± std."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    full = rows[rows["policy"] == "full"]
    if len(full):
        m, sd = 100 * float(full["acc_mean"].iloc[0]), 100 * float(full["acc_std"].iloc[0])
        ax.axhspan(m - sd, m + sd, color="0.8", alpha=0.6, label=f"full {m:.2f} ± {sd:.2f}")
        ax.axhline(m, color="0.4", lw=1)
    for i, (policy, g) in enumerate(rows[rows["policy"] != "full"].groupby("policy", sort=False)):
        g = g.sort_values("budget_spent")
        ax.errorbar(g["budget_spent"], 100 * g["acc_mean"], yerr=100 * g["acc_std"], marker="o", ms=4, capsize=3,
                    color=plt.get_cmap("tab10")(i % 10), label=policy)
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
        ax.set_yticks(range(e), [str(i + 1) for i in range(e)], fontsize=7)
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
    x = np.arange(1, rows["relabel"].shape[0] + 1)
    for key in ("relabel", "suppress"):
        axes[0, 0].plot(x, rows[key], marker="o", label=key)
    axes[0, 0].set(xlabel="epoch", ylabel="samples", title="suspected labels")
    axes[0, 0].legend()
    for key in quality:
        axes[0, 1].plot(x, rows[key], marker="o", label=key)
    if quality:
        axes[0, 1].set(xlabel="epoch", ylim=(0, 1.02), title="against the injected flips")
        axes[0, 1].legend()
    fig.tight_layout()
    return fig


def fig_examples(grid: dict[str, list[tuple[bytes, str]]]):
    """One row per region: its example images (PNG bytes) with a caption each."""
    from PIL import Image

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

def _curves(ws: Workspace, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    curves = []
    for run in runs:
        ep = load_epochs(ws, run["run_id"])
        if not len(ep):
            continue
        n = len(load_train_samples(ws, run["dataset"]))
        spent, wall = budget_curve(ep["sample_steps"].to_numpy(), ep["wall_s"].to_numpy(), int(run["epochs"]), n)
        acc = ep["test_acc"].to_numpy(dtype=np.float64, na_value=np.nan)
        curves.append({"label": f"{run['policy']} s{run['seed']} ({run['run_id'][-4:]})", "policy": run["policy"],
                       "spent": spent, "wall": wall, "acc": acc})
    return curves


def _main_run_figures(ws: Workspace, run: dict[str, Any], *, epoch: int | None, per_region: int,
                      max_points: int, notes: list[str]) -> dict[str, tuple[bytes, str]]:
    """joint, class_rates and examples figures of ``run`` (the first run given)."""
    dataset, encoder = run["dataset"], run["config"].get("encoder", "lite0-minilm")
    samples = load_train_samples(ws, dataset)
    hist = load_history(ws, run["run_id"])
    figs: dict[str, tuple[bytes, str]] = {}
    if not len(hist):
        notes.append(f"run {run['run_id']} has no epochs yet: no selection figures")
        return figs
    epochs_done = int(hist["epoch"].max()) + 1
    hist = hist.merge(samples[["key", "label"]], on="key", how="inner")
    hist["strong"] = hist["selected"] & (hist["aug"] == "strong")
    sel_rate, strong_rate = class_rates(hist["epoch"].to_numpy(), hist["label"].to_numpy(), hist["selected"].to_numpy(),
                                        hist["strong"].to_numpy(), epochs_done, len(ws.dataset_info(dataset)["classes"]))
    figs["class_rates"] = (_png(fig_class_rates(sel_rate, strong_rate, ws.dataset_info(dataset)["classes"])),
                           f"Per-class share selected and strongly augmented, per epoch ({run['run_id']}).")
    scores = load_scores(ws, dataset, encoder)
    if hist["status"].notna().any():   # the selector kept a label verdict
        figs["suspects"] = _suspects_figure(hist[["epoch", "key", "status"]], samples, scores, epochs_done,
                                            run["run_id"], notes)
    if scores is None:
        notes.append(f"no scores for {dataset} under encoder {encoder}: joint and example figures skipped "
                     f"(run `dds index {dataset} --encoder {encoder}`)")
        return figs
    if epoch is None:
        epoch = default_epoch(hist.groupby("epoch")["selected"].sum().reindex(range(epochs_done), fill_value=0).to_numpy())
    elif not 0 <= epoch < epochs_done:
        raise DdsError(f"--epoch must be in [1, {epochs_done}] for run {run['run_id']}, got {epoch + 1}")
    one = scores.merge(hist.loc[hist["epoch"] == epoch, ["key", "selected", "strong"]], on="key", how="left")
    one[["selected", "strong"]] = one[["selected", "strong"]].fillna(False).astype(bool)
    figs["joint"] = (_png(fig_joint(one["density"].to_numpy(), one["consistency"].to_numpy(), one["region"].to_numpy(),
                                    one["selected"].to_numpy(), one["strong"].to_numpy(), epoch=epoch,
                                    max_points=max_points)),
                     f"Density vs consistency ({encoder}) by region, and the selection of epoch {epoch + 1}.")
    picks = pick_examples(scores["region"].to_numpy(), {c: scores[c].to_numpy() for c in ("joint", "prob_label", "density")},
                          per_region)
    keys = [k for rows in picks.values() for k in scores["key"].to_numpy()[rows]]
    images = read_images(ws, dataset, keys, samples)
    classes = ws.dataset_info(dataset)["classes"]
    grid = {name: [(images[scores["key"].iat[i]], f"{str(classes[scores['label'].iat[i]])[:12]} "
                                                  f"p={scores['prob_label'].iat[i]:.2f}")
                   for i in rows if scores["key"].iat[i] in images] for name, rows in picks.items()}
    grid = {k: v for k, v in grid.items() if v}
    if grid:
        figs["examples"] = (_png(fig_examples(grid)), "Example images per region (given label, prob_label).")
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


def _html(runs: list[dict[str, Any]], figs: dict[str, tuple[bytes, str]], notes: list[str]) -> str:
    cols = ("run_id", "dataset", "policy", "seed", "budget", "budget_spent", "test_acc", "epochs_done", "wall_s", "status")
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in runs)
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>dds report</title>",
             "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;border-bottom:1px solid #ddd}"
             "img{max-width:100%}</style></head><body><h1>dds report</h1>",
             "<table><tr>" + "".join(f"<th>{c}</th>" for c in cols) + f"</tr>{rows}</table>"]
    parts += [f"<p><em>{html.escape(n)}</em></p>" for n in notes]
    for name, (png, caption) in figs.items():
        data = base64.b64encode(png).decode("ascii")
        parts.append(f"<h2>{html.escape(name)}</h2><p>{html.escape(caption)}</p>"
                     f"<img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>")
    return "\n".join(parts + ["</body></html>"])


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_report(ws: Workspace, run_ids: list[str], out: str | Path, *, epoch: int | None = None,
                 per_region: int = 8, max_points: int = 20000) -> dict[str, Any]:
    """Write the figures of ``run_ids`` as PNGs and ``index.html`` (PNGs as data URIs) into ``out``.

    Args:
        ws: the workspace.
        run_ids: runs to show, or ``dds bench`` ids (each stands for all its runs and adds the
            accuracy-against-budget figure); the curves show all runs, the joint / class / example
            figures the first.
        out: output folder (created).
        epoch: 0-based epoch whose selection the joint figure marks [default: the most selective one].
        per_region: example images per region.
        max_points: above this many samples the joint figure draws a 2-D histogram behind a subsample.

    Returns:
        {"html": path, "figures": [PNG paths], "notes": [what was skipped and why]}.

    Raises:
        DdsError: no run ids, an unknown run id, or ``epoch`` outside the first run's epochs.
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
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    figs = _main_run_figures(ws, runs[0], epoch=epoch, per_region=per_region, max_points=max_points, notes=notes)
    curves = _curves(ws, runs)
    if curves:
        figs = {"curves": (_png(fig_curves(curves)), "Test accuracy against budget spent and wall-clock, per run."),
                **figs}
    for i, bench in enumerate(benches):
        figs = {f"budget{i or ''}": (_png(fig_budget(bench)), f"Bench {bench['bench_id'].iloc[0]}: final accuracy "
                                     "against budget spent per entry (mean ± std over seeds); full as a band."),
                **figs}
    paths = []
    for name, (png, _) in figs.items():
        (out / f"{name}.png").write_bytes(png)
        paths.append(str(out / f"{name}.png"))
    (out / "index.html").write_text(_html(runs, figs, notes), encoding="utf-8")
    log.info("report of %d run(s) written to %s", len(runs), out)
    return {"html": str(out / "index.html"), "figures": paths, "notes": notes}
