"""Label-noise detection of `dds index` against the injected flips: one JSON line per dataset x method.

    python benchmarks/noise_detection.py -w WORKSPACE NAME [NAME ...] [--first-pass] [--out FILE]

Methods, all from the scores table that `dds index NAME` wrote (and `label_orig` from samples, to score):

* ``dds-verdict``: ``status != clean`` (relabel or suppress), and relabel accuracy;
* ``cleanlab``: cleanlab's ``find_label_issues`` on the table's ``probs`` (the trimmed second pass);
* ``fixed-thresholds``: the rule before issue 11 (``prob_label < 0.10`` and ``knn_agreement < 0.5``),
  on the same table;
* with ``--first-pass``: ``cleanlab-first-pass``, cleanlab on the adapters' untrimmed first pass
  (retrained here, the same folds and seeds as `dds index`), i.e. its usual input.

On a dataset without injected noise a row gives the share of samples flagged.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from dds.pipeline import adapters as adapt
from dds.pipeline.audit import cleanlab_flags, flag_metrics, load_audit_inputs, relabel_accuracy
from dds.pipeline.index import load_inputs
from dds.workspace import Workspace


def rows_for(ws: Workspace, name: str, encoder: str, first_pass: bool, command: str, commit: str) -> list[dict]:
    df = load_audit_inputs(ws, name, encoder)
    info = json.loads((ws.dataset_dir(name) / "dataset.json").read_text())
    noise = info.get("label_noise", {})
    labels, orig = df["label"].to_numpy(), df["label_orig"].to_numpy()
    truth = labels != orig
    probs = np.stack(df["probs"].to_numpy())
    flags = {"dds-verdict": df["status"].to_numpy() != "clean", "cleanlab": cleanlab_flags(labels, probs)}
    knn_agree = pq.read_table(ws.index_dir(name, encoder) / "scores.parquet", columns=["knn_agreement"])
    flags["fixed-thresholds"] = (df["prob_label"].to_numpy() < 0.10) & (knn_agree.column(0).to_numpy() < 0.5)
    if first_pass:
        d = load_inputs(ws, name, encoder)
        assert list(d["keys"]) == df["key"].tolist()
        fit = adapt.crossfit_adapters(d["img"], d["labels"], d["text"], folds=5, seed=0)
        flags["cleanlab-first-pass"] = cleanlab_flags(labels, fit.scores.dense()[1])
    out = []
    for method, flag in flags.items():
        if flag is None:
            continue
        row = {"command": command, "commit": commit, "dataset": name, "encoder": encoder,
               "noise_kind": noise.get("kind") if truth.any() else "none",
               "rate": noise.get("fraction", 0.0) if truth.any() else 0.0, "n": int(len(labels)),
               "n_flips": int(truth.sum()), "method": method, "n_flagged": int(flag.sum()),
               "share_flagged": round(float(flag.mean()), 4)}
        if truth.any():
            m = flag_metrics(flag, truth)
            row.update({k: round(float(m[k]), 4) for k in ("precision", "recall", "f1")})
            if method == "dds-verdict":
                r = relabel_accuracy(df["status"].to_numpy(), df["label_fixed"].to_numpy(), orig)
                row.update(relabelled=r["relabelled"], relabel_acc=round(r["relabel_acc"], 4),
                           suppressed=r["suppressed"])
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="+")
    ap.add_argument("-w", "--workspace", required=True)
    ap.add_argument("-e", "--encoder", default="lite0-minilm")
    ap.add_argument("--first-pass", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "noise_detection.jsonl"))
    a = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    command = "python " + " ".join(sys.argv)
    ws = Workspace(Path(a.workspace))
    with open(a.out, "a") as f:
        for name in a.names:
            for row in rows_for(ws, name, a.encoder, a.first_pass, command, commit):
                print(json.dumps(row))
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
