"""Does the trained network's loss history add to the static label verdict? One JSON line per dataset.

    python benchmarks/loss_dynamics.py -w WORKSPACE NAME [--run RUN_ID] [--out FILE]

Needs a dataset with injected noise (``label_orig``), its `dds index` scores, and a finished run that
observed every train sample every epoch (``dds train NAME --policy full``; the latest such run unless
``--run``). Scores each candidate ranking by its AUROC against the injected flips (evaluation only:
nothing here feeds back into the method):

* ``static``: ``1 - label_posterior`` of the verdict;
* ``loss_e``: the run's loss of epoch ``e``, and ``loss_mean_e`` its mean over epochs ``0..e``;
* ``static+w*loss``: the rank of ``static`` plus ``w`` times the rank of ``loss_mean_e``
  (w = 0.25, 0.5, 1), and the same with ranks taken within each given label's class.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from dds.catalog import connect
from dds.workspace import Workspace


def auroc(score: np.ndarray, truth: np.ndarray) -> float:
    """Probability that a random flipped sample scores above a random clean one (ties broken by order)."""
    ranks = np.argsort(np.argsort(score, kind="stable"), kind="stable") + 1
    pos = int(truth.sum())
    return float((ranks[truth].sum() - pos * (pos + 1) / 2) / (pos * (truth.size - pos)))


def measure(ws: Workspace, name: str, run: str | None) -> dict:
    con = connect(ws)
    if run is None:
        found = con.sql(f"SELECT run_id FROM runs WHERE dataset = '{name}' AND policy = 'full' AND status = 'done' "
                        "ORDER BY updated DESC LIMIT 1").fetchall()
        if not found:
            sys.exit(f"no finished `full` run of {name}; run `dds train {name} --policy full` first")
        run = found[0][0]
    df = con.sql(f"""SELECT h.key, h.epoch, h.loss, s.label, s.label <> s.label_orig AS flip,
                            1 - c.label_posterior AS static
                     FROM history h JOIN samples s ON s.dataset = '{name}' AND s.key = h.key
                     JOIN scores c ON c.dataset = '{name}' AND c.key = h.key
                     WHERE h.run_id = '{run}' AND h.selected""").df()
    loss = df.pivot_table(index="key", columns="epoch", values="loss")
    meta = df.drop_duplicates("key").set_index("key").loc[loss.index]
    truth, static, label = meta["flip"].to_numpy(bool), meta["static"].to_numpy(), meta["label"].to_numpy()
    if not truth.any():
        sys.exit(f"{name} has no injected noise to score against")

    def rank(x: np.ndarray, within_class: bool = False) -> np.ndarray:
        s = pd.Series(x)
        return (s.groupby(label).rank(pct=True) if within_class else s.rank(pct=True)).to_numpy()

    out = {"dataset": name, "run_id": run, "samples": int(truth.size), "flips": int(truth.sum()),
           "static": round(auroc(static, truth), 4)}
    for e in loss.columns:
        mean_e = loss.loc[:, :e].mean(axis=1).to_numpy()
        out[f"loss_{e}"] = round(auroc(loss[e].to_numpy(), truth), 4)
        out[f"loss_mean_{e}"] = round(auroc(mean_e, truth), 4)
        for w in (0.25, 0.5, 1.0):
            out[f"static+{w:g}*loss_mean_{e}"] = round(auroc(rank(static) + w * rank(mean_e), truth), 4)
            out[f"class: static+{w:g}*loss_mean_{e}"] = round(
                auroc(rank(static, True) + w * rank(mean_e, True), truth), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("-w", "--workspace", required=True)
    ap.add_argument("--run", default=None, help="run id (default: the latest finished `full` run of NAME)")
    ap.add_argument("--out", default=None, help="append the JSON line to this file")
    args = ap.parse_args()
    row = measure(Workspace(Path(args.workspace)), args.name, args.run)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                            text=True).stdout.strip()
    row = {"command": " ".join(["python", *sys.argv]), "commit": commit, **row}
    print(json.dumps(row, indent=1))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
