"""Do other strong views pay more? `dds bench` with ``strong``'s operation list swapped for this process.

    python benchmarks/views_probe.py [-w WORKSPACE] NAME --ops OPS --policies P[,P...] [--budgets 0.5]
        [--epochs 60] [--seeds 1] [--first-seed 0] [--eval-split val] [--results FILE]

Diagnostic only: the shipped ``strong`` draws one operation per sample from
:func:`dds.train.augment.strong_ops` (TrivialAugment's recipe). ``--ops`` replaces that list:

* ``trivial``: the shipped list (the control);
* ``erase``: random erasing alone (Zhong et al., AAAI 2020), a zero rectangle of 2 % up to 2 + 38 m %
  of the image (m: the sample's magnitude), aspect ratio 0.3-3.3.

Everything else is `dds bench` (rows to ``--results``, this command line in their ``command``).
"""
from __future__ import annotations

import argparse
import shlex
import sys

from torchvision.transforms import v2

import dds.train.augment as augment
from dds.bench.training import run_bench
from dds.workspace import Workspace

SHIPPED = augment.strong_ops


def erase_ops(channels: int, magnitude: float) -> list[v2.Transform]:
    """The ``erase`` list: one random-erasing operation at ``magnitude``."""
    return [v2.RandomErasing(p=1.0, scale=(0.02, 0.02 + 0.38 * float(magnitude)), ratio=(0.3, 3.3), value=0)]


OPS = {"trivial": SHIPPED, "erase": erase_ops}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("-w", "--workspace", help="default: $DDS_WORKSPACE, else ./dds-work")
    ap.add_argument("--ops", choices=sorted(OPS), required=True)
    ap.add_argument("--policies", required=True, help="bench entries, comma-separated (dds,dds:strong_aug=all)")
    ap.add_argument("--budgets", default="0.5")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--eval-split", choices=("val", "test"), default="val")
    ap.add_argument("--results")
    args = ap.parse_args()
    augment.strong_ops = OPS[args.ops]   # read by the registered ``strong`` when each run builds its Augmenter
    ws = Workspace.resolve(args.workspace)
    rows = run_bench(ws, args.name, policies=args.policies.split(","),
                     budgets=[float(b) for b in args.budgets.split(",")], epochs=args.epochs, seeds=args.seeds,
                     base_config={"eval_split": args.eval_split, "eval_every": args.epochs, "seed": args.first_seed},
                     progress=False, results=args.results,
                     command=shlex.join(["python", "benchmarks/views_probe.py", *sys.argv[1:]]))
    for row in rows:
        print(args.ops, row["policy"], row["budget"], {k: row[k] for k in ("acc_mean", "accs", "budget_spent")})


if __name__ == "__main__":
    main()
