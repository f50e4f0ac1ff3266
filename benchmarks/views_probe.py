"""Do other strong views pay more? `dds bench` with ``strong``'s operation list swapped for this process.

    python benchmarks/views_probe.py [-w WORKSPACE] NAME --ops OPS --policies P[,P...] [--budgets 0.5]
        [--epochs 60] [--seeds 1] [--first-seed 0] [--eval-split val] [--results FILE]

Diagnostic only: the shipped ``strong`` draws one operation per sample from
:func:`dds.train.augment.strong_ops` (TrivialAugment's recipe). ``--ops`` replaces that list:

* ``trivial``: the shipped list (the control);
* ``erase``: random erasing alone (Zhong et al., AAAI 2020), a zero rectangle of 2 % up to 2 + 38 m %
  of the image (m: the sample's magnitude), aspect ratio 0.3-3.3;
* ``trivial-erase``: one operation of the shipped list *followed by* that erasing, the recipe of
  TrivialAugment then Cutout. The batched strong path applies one operation only, so this list runs
  every strong view per sample (the same pixels ``Augmenter.__call__`` makes, more slowly);
* ``mixup``: no image operation; a strong sample is mixed with a partner drawn from its batch
  instead (mixup, Zhang et al., ICLR 2018): ``lam * x + (1 - lam) * x_partner`` and the loss
  ``lam * CE(y) + (1 - lam) * CE(y_partner)``, with ``1 - lam`` drawn uniformly up to ``m / 2`` (at full
  strength the mixing weight of mixup with ``alpha = 1``). Runs without prefetching, so the batch
  the augmenter made is the one the loop trains next.

Everything else is `dds bench` (rows to ``--results``, this command line in their ``command``).
"""
from __future__ import annotations

import argparse
import shlex
import sys
import types

import numpy as np
import torch
from torchvision.transforms import v2

import dds.train.augment as augment
import dds.train.loop as loop
from dds.bench.training import run_bench
from dds.workspace import Workspace

SHIPPED = augment.strong_ops


def erase_ops(channels: int, magnitude: float) -> list[v2.Transform]:
    """The ``erase`` list: one random-erasing operation at ``magnitude``."""
    return [v2.RandomErasing(p=1.0, scale=(0.02, 0.02 + 0.38 * float(magnitude)), ratio=(0.3, 3.3), value=0)]


def trivial_erase_ops(channels: int, magnitude: float) -> list[v2.Transform]:
    """The ``trivial-erase`` list: each shipped operation followed by the ``erase`` operation."""
    erase, = erase_ops(channels, magnitude)
    return [v2.Compose([op, erase]) for op in SHIPPED(channels, magnitude)]


OPS = {"trivial": SHIPPED, "erase": erase_ops, "trivial-erase": trivial_erase_ops,
       "mixup": lambda channels, magnitude: [v2.Identity()]}
_INIT = augment.Augmenter.__init__


def _per_sample_strong(self, *args, **kwargs) -> None:
    """``Augmenter.__init__``, then strong views made per sample (the batched path draws one operation)."""
    _INIT(self, *args, **kwargs)
    self._choices, self._affine_ok = None, False


_MIX: dict = {}   # the batch in flight: its codes and seeds, then its partners and weights


def _mix_strong_samples() -> None:
    """Wraps ``Augmenter.batch`` (records the batch's codes), the loop's ``normalize`` (mixes the strong
    samples' images) and its ``cross_entropy`` (mixes their losses) for ``--ops mixup``."""
    batch, norm, ce = augment.Augmenter.batch, loop.normalize, torch.nn.functional.cross_entropy

    def recording_batch(self, images, codes, seeds):
        _MIX.clear()
        _MIX.update(codes=np.asarray(codes), seeds=np.asarray(seeds))
        return batch(self, images, codes, seeds)

    def mixing_normalize(x, mean, std):
        out, codes = norm(x, mean, std), _MIX.pop("codes", None)
        if codes is None or not codes.any():   # evaluation, or no strong sample in this batch
            return out
        gen = torch.Generator()
        gen.manual_seed(int(_MIX["seeds"][0]))   # the batch's first sample seed: a pure function of the plan
        b = len(codes)
        partner = torch.randint(0, b, (b,), generator=gen)
        lam = 1.0 - 0.5 * torch.from_numpy(augment.code_magnitude(codes)) * torch.rand(b, generator=gen)
        partner, lam = partner.to(out.device), lam.to(out.device)
        _MIX.update(partner=partner, lam=lam)
        w = lam.view(-1, 1, 1, 1)
        return w * out + (1.0 - w) * out[partner]

    def mixing_ce(logits, y, **kwargs):
        loss = ce(logits, y, **kwargs)
        if "partner" not in _MIX:
            return loss
        partner, lam = _MIX.pop("partner"), _MIX.pop("lam")
        return lam * loss + (1.0 - lam) * ce(logits, y[partner], **kwargs)

    augment.Augmenter.batch = recording_batch
    loop.normalize = mixing_normalize
    loop.F = types.SimpleNamespace(cross_entropy=mixing_ce)


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
    if args.ops == "mixup":
        _mix_strong_samples()
    augment.strong_ops = OPS[args.ops]   # read by the registered ``strong`` when each run builds its Augmenter
    if args.ops == "trivial-erase":
        augment.Augmenter.__init__ = _per_sample_strong
    ws = Workspace.resolve(args.workspace)
    rows = run_bench(ws, args.name, policies=args.policies.split(","),
                     budgets=[float(b) for b in args.budgets.split(",")], epochs=args.epochs, seeds=args.seeds,
                     base_config={"eval_split": args.eval_split, "eval_every": args.epochs, "seed": args.first_seed,
                                  **({"prefetch": 0} if args.ops == "mixup" else {})},
                     progress=False, results=args.results,
                     command=shlex.join(["python", "benchmarks/views_probe.py", *sys.argv[1:]]))
    for row in rows:
        print(args.ops, row["policy"], row["budget"], {k: row[k] for k in ("acc_mean", "accs", "budget_spent")})


if __name__ == "__main__":
    main()
