"""How many of the samples the verdict suppresses does a trained model give their given label?

    python benchmarks/suspect_agreement.py [-w WORKSPACE] NAME RUN_ID [RUN_ID ...] [--results FILE]

RUN_ID: finished `dds` runs of NAME (their final weights never trained the suppressed samples). For
each run it prints, and appends to ``--results`` as one JSON row, how many suppressed samples the
model predicts as their given label (argmax), and how many at probability >= 0.5 / 0.7 / 0.9. Only
given labels are read, never ``label_orig``: this is what a rule that clears a suspect when the
network agrees with its label could clear at best, with the labels of a finished run
(docs/experiments.md, "Issue 28: how many suspects could the network clear?").
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys

import numpy as np

from dds.bench.training import _append_jsonl, _git_commit
from dds.workspace import Workspace
from oracle_noise import suspect_probs

LEVELS = (0.5, 0.7, 0.9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("run_ids", nargs="+", metavar="RUN_ID")
    ap.add_argument("-w", "--workspace", help="default: $DDS_WORKSPACE, else ./dds-work")
    ap.add_argument("--results")
    args = ap.parse_args()
    ws = Workspace.resolve(args.workspace)
    commit = _git_commit()
    for run_id in args.run_ids:
        sus, prob, _, train = suspect_probs(ws, args.name, run_id)
        given = train.labels[sus]
        p_given = prob[np.arange(sus.size), given]
        run = json.loads((ws.run_dir(run_id) / "run.json").read_text())
        row = {"dataset": args.name, "run_id": run_id, "seed": run["seed"], "acc": run["test_acc"],
               "eval_split": json.loads(run["config"]).get("eval_split"), "train": int(train.n),
               "suppressed": int(sus.size),
               "argmax_given": int(np.count_nonzero(prob.argmax(1) == given)),
               **{f"p_given_ge_{t:g}": int(np.count_nonzero(p_given >= t)) for t in LEVELS},
               "command": shlex.join(["python", "benchmarks/suspect_agreement.py", *sys.argv[1:]]), "commit": commit}
        left = row["suppressed"] - row["argmax_given"]
        print(f"{run_id}: {sus.size} suppressed ({100 * sus.size / train.n:.2f} %), the model names the given label "
              f"for {row['argmax_given']}; clearing all of them leaves {left} ({100 * left / train.n:.2f} %)")
        if args.results:
            _append_jsonl(args.results, row)


if __name__ == "__main__":
    main()
