"""What is left to gain from better label-noise handling? `dds` trained under oracle label handling.

    python benchmarks/oracle_noise.py [-w WORKSPACE] NAME --mode MODE [--seeds 1] [--epochs 12] [--policy dds]
        [--results FILE]

Diagnostic only: it reads the injected truth (``label_orig``), which no product code path does, and
nothing here feeds back into the method or its constants. NAME needs injected noise and its
`dds index` verdict. Each mode runs `dds bench NAME --policies POLICY --budgets 0.5 --eval-split val`
(``--policy``: ``dds``, or ``dds`` with options, e.g. ``dds:strong_aug=none``) with the verdict's masks
replaced. ``truth`` marks the flipped samples relabelled, so they never get strong views; compare it with
``strong_aug=none`` on both sides. The modes:

* ``verdict``: the verdict as `dds index` wrote it (what `dds` does);
* ``drop-residual``: the verdict, and every sample it would train on a wrong label suppressed too
  (the cost of the wrong labels the verdict misses or relabels wrongly);
* ``truth``: every sample trained on its true label, nothing suppressed. It stands for `dds` with
  ``noise_handling=off`` on the same images with their true labels, not for `dds` with its verdict
  there: on clean data the verdict also suppresses the most ambiguous samples, which is worth about a
  point on its own (docs/experiments.md, "Issue 28: the noise oracle checked").

Rows go to ``--results`` like `dds bench` rows, this command line in their ``command``.
"""
from __future__ import annotations

import argparse
import shlex
import sys

import numpy as np

import dds.selector._dds as dds_policy
from dds.tables import load_train_samples
from dds.bench.training import run_bench
from dds.workspace import Workspace

MODES = ("verdict", "drop-residual", "truth")


def true_labels(ws: Workspace, name: str) -> np.ndarray:
    """(N,) injected truth of the train split, in ``samples.idx`` order."""
    return load_train_samples(ws, name)["label_orig"].to_numpy(np.int64)


def oracle_masks(mode: str, truth: np.ndarray):
    """A replacement for :func:`dds.selector._dds.noise_masks` under ``mode``."""
    verdict_masks = dds_policy.noise_masks

    def masks(info, handling):
        suppressed, relabelled = verdict_masks(info, handling)
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
    ap.add_argument("--results")
    args = ap.parse_args()
    if args.policy.split(":")[0] != "dds":
        ap.error(f"--policy must be dds or dds:OPTIONS, got {args.policy!r}")
    ws = Workspace.resolve(args.workspace)
    dds_policy.noise_masks = oracle_masks(args.mode, true_labels(ws, args.name))
    rows = run_bench(ws, args.name, policies=[args.policy], budgets=[0.5], epochs=args.epochs, seeds=args.seeds,
                     base_config={"eval_split": "val", "eval_every": args.epochs}, progress=False,
                     results=args.results, command=shlex.join(["python", "benchmarks/oracle_noise.py", *sys.argv[1:]]))
    print(args.mode, {k: rows[0][k] for k in ("acc_mean", "accs", "budget_spent")})


if __name__ == "__main__":
    main()
