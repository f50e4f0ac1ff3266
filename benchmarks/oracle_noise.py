"""What is left to gain from better label-noise handling? `dds` trained under oracle label handling.

    python benchmarks/oracle_noise.py [-w WORKSPACE] NAME --mode MODE [--seeds 1] [--epochs 12] [--policy dds]
        [--labels-from RUN_ID] [--min-conf 0] [--eval-split val] [--results FILE]

Diagnostic only: it reads the injected truth (``label_orig``), which no product code path does, and
nothing here feeds back into the method or its constants. NAME needs injected noise and its
`dds index` verdict. Each mode runs `dds bench NAME --policies POLICY --budgets 0.5 --eval-split val`
(``--eval-split test`` for a final table; ``--policy``: ``dds``, or ``dds`` with options, e.g.
``dds:strong_aug=none``) with the verdict's masks replaced. ``truth`` marks the flipped samples
relabelled, so they never get strong views; compare it with ``strong_aug=none`` on both sides. The modes:

* ``verdict``: the verdict as `dds index` wrote it (what `dds` does);
* ``drop-residual``: the verdict, and every sample it would train on a wrong label suppressed too
  (the cost of the wrong labels the verdict misses or relabels wrongly);
* ``truth``: every sample trained on its true label, nothing suppressed. It stands for `dds` with
  ``noise_handling=off`` on the same images with their true labels, not for `dds` with its verdict
  there: on clean data the verdict also suppresses the most ambiguous samples, which is worth about a
  point on its own (docs/experiments.md, "Issue 28: the noise oracle checked").
* ``agree``: the verdict, and each suppressed sample on which a trained model (``--labels-from``: the
  final weights of an earlier `dds` run of NAME, which never trained the suppressed samples) and the
  encoder agree (the model's argmax is the scores' ``pred_label``, with probability >= ``--min-conf``)
  relabelled to that class from the first epoch. The best an online rescue of the suspects could do
  with these two signals: labels of a finished run, known from the start.

Rows go to ``--results`` like `dds bench` rows, this command line in their ``command``.
"""
from __future__ import annotations

import argparse
import shlex
import sys

import numpy as np
import pandas as pd
import torch

import dds.selector._dds as dds_policy
from dds.tables import load_scores, load_train_samples
from dds.train.augment import normalize
from dds.train.data import CachedSplit
from dds.train.loop import load_trained
from dds.bench.training import run_bench
from dds.workspace import Workspace

MODES = ("verdict", "drop-residual", "truth", "agree")


def true_labels(ws: Workspace, name: str) -> np.ndarray:
    """(N,) injected truth of the train split, in ``samples.idx`` order."""
    return load_train_samples(ws, name)["label_orig"].to_numpy(np.int64)


def suspect_probs(ws: Workspace, name: str, run_id: str) -> tuple[np.ndarray, np.ndarray, pd.DataFrame, CachedSplit]:
    """``(suppressed, prob, scores, train)``: the train indices the verdict suppresses, ``run_id``'s
    final model's class probabilities for them (base views, no gradient), the scores in train order and
    the decoded train split."""
    model, card = load_trained(ws.run_dir(run_id) / "checkpoint.pt")
    scores = load_scores(ws, name, card["config"]["encoder"], ["key", "status", "pred_label"])
    train = CachedSplit(ws, name, "train")
    row = scores.set_index("key").loc[train.keys]
    sus = np.flatnonzero(row["status"].to_numpy() == "suppress")
    parts = []
    with torch.no_grad():
        for b in range(0, sus.size, 512):
            images = normalize(train.images[torch.from_numpy(sus[b:b + 512])], card["mean"], card["std"])
            parts.append(torch.softmax(model(images), 1))
    prob = torch.cat(parts).numpy() if parts else np.zeros((0, len(card["classes"])), np.float32)
    return sus, prob, row, train


def agreed_labels(ws: Workspace, name: str, run_id: str, min_conf: float, truth: np.ndarray) -> np.ndarray:
    """(N,) the class on which ``run_id``'s model and the encoder's ``pred_label`` agree for each sample
    the verdict suppresses (-1 where they do not, or the model's probability is under ``min_conf``, and
    for every other sample). Prints how many agree and, from the truth, how many of those are right."""
    sus, prob, row, train = suspect_probs(ws, name, run_id)
    guess = row["pred_label"].to_numpy()[sus]
    ok = (prob.argmax(1) == guess) & (prob.max(1) >= min_conf)
    out = np.full(train.n, -1, np.int64)
    out[sus[ok]] = guess[ok]
    print(f"agree: {ok.sum()} of {sus.size} suppressed samples, {np.mean(guess[ok] == truth[sus[ok]]):.3f} right")
    return out


def oracle_masks(mode: str, truth: np.ndarray, agreed: np.ndarray | None = None):
    """A replacement for :func:`dds.selector._dds.noise_masks` under ``mode``."""
    verdict_masks = dds_policy.noise_masks

    def masks(info, handling):
        suppressed, relabelled = verdict_masks(info, handling)
        if mode == "agree":
            rescued = suppressed & (agreed >= 0)
            object.__setattr__(info, "label_fixed", np.where(rescued, agreed, info.label_fixed))   # this run only
            return suppressed & ~rescued, relabelled | rescued
        if mode == "drop-residual":
            wrong = np.where(relabelled, info.label_fixed, info.labels) != truth
            return suppressed | wrong, relabelled & ~wrong
        if mode == "truth":
            object.__setattr__(info, "label_fixed", truth)   # SampleInfo is frozen; this run only
            return np.zeros_like(suppressed), truth != info.labels
        return suppressed, relabelled
    return masks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("-w", "--workspace", help="default: $DDS_WORKSPACE, else ./dds-work")
    ap.add_argument("--mode", choices=MODES, required=True)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--policy", default="dds", help="dds, or dds with options (dds:strong_aug=none)")
    ap.add_argument("--labels-from", help="agree: the run whose final model labels the suppressed samples")
    ap.add_argument("--min-conf", type=float, default=0.0, help="agree: the model's least probability")
    ap.add_argument("--eval-split", choices=("val", "test"), default="val")
    ap.add_argument("--results")
    args = ap.parse_args()
    if args.policy.split(":")[0] != "dds":
        ap.error(f"--policy must be dds or dds:OPTIONS, got {args.policy!r}")
    if (args.mode == "agree") != bool(args.labels_from):
        ap.error("--labels-from goes with --mode agree, and only with it")
    ws = Workspace.resolve(args.workspace)
    truth = true_labels(ws, args.name)
    agreed = agreed_labels(ws, args.name, args.labels_from, args.min_conf, truth) if args.labels_from else None
    dds_policy.noise_masks = oracle_masks(args.mode, truth, agreed)
    rows = run_bench(ws, args.name, policies=[args.policy], budgets=[0.5], epochs=args.epochs, seeds=args.seeds,
                     base_config={"eval_split": args.eval_split, "eval_every": args.epochs}, progress=False,
                     results=args.results, command=shlex.join(["python", "benchmarks/oracle_noise.py", *sys.argv[1:]]))
    print(args.mode, {k: rows[0][k] for k in ("acc_mean", "accs", "budget_spent")})


if __name__ == "__main__":
    main()
