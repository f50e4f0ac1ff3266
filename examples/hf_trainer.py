"""``dds.selector.DropIn`` under a Hugging Face ``Trainer``: two overridden methods and ``max_steps``.

``get_train_dataloader`` hands the drop-in's sampler to the loader, ``compute_loss`` returns the
plan's weighted loss from ``update``, and ``max_steps=ds.steps(batch_size)`` tells the Trainer how
many steps the budgeted epochs hold (their sizes differ from the full dataset's)::

    python examples/hf_trainer.py --synthetic 256 --epochs 2      # tiny generated images
    python examples/hf_trainer.py --limit 5000 --epochs 4         # Fashion-MNIST
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, default_collate
from transformers import Trainer, TrainingArguments

from dds.selector import DropIn

sys.path.insert(0, str(Path(__file__).parent))
from plain_loop import accuracy, fashion_mnist, synthetic  # noqa: E402  (the same data as the plain loop)


def collate(batch: list) -> dict[str, torch.Tensor]:
    """``(x, y)`` pairs -> the dict of tensors the Trainer moves to the device."""
    x, y = default_collate(batch)
    return {"pixel_values": x, "labels": y}


class DropInTrainer(Trainer):
    """A ``Trainer`` whose ``train_dataset`` is a ``DropIn``."""

    def get_train_dataloader(self) -> DataLoader:
        ds = self.train_dataset
        loader = DataLoader(ds, batch_size=self._train_batch_size, sampler=ds.sampler, collate_fn=collate)
        return self.accelerator.prepare(loader)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits = model(inputs["pixel_values"])
        per_sample = F.cross_entropy(logits, inputs["labels"], reduction="none")
        loss = self.train_dataset.update(per_sample) if model.training else per_sample.mean()
        return (loss, {"logits": logits}) if return_outputs else loss


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet10t", help="any timm model name")
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--limit", type=int, default=5000, help="first N Fashion-MNIST train (and N // 5 test) images")
    p.add_argument("--synthetic", type=int, metavar="N", help="train on N generated images instead")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.synthetic:
        train, test = synthetic(args.synthetic), synthetic(max(1, args.synthetic // 4), seed=1)
    else:
        train, test = fashion_mnist("train", args.limit), fashion_mnist("test", max(1, args.limit // 5))
    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, pretrained=False, num_classes=int(train.targets.max()) + 1, in_chans=1)
    ds = DropIn(train, "dds", epochs=args.epochs, budget=args.budget, seed=args.seed)
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(output_dir=out, max_steps=ds.steps(args.batch_size),
                                  per_device_train_batch_size=args.batch_size, learning_rate=0.05, optim="sgd",
                                  lr_scheduler_type="cosine", save_strategy="no", report_to="none",
                                  use_cpu=not torch.cuda.is_available(), seed=args.seed, remove_unused_columns=False)
        DropInTrainer(model=model, args=targs, train_dataset=ds).train()
    acc = accuracy(model.cpu(), test)
    spent = ds.selector.spent() / (args.epochs * len(ds))
    print(f"test acc {acc:.4f}, budget spent {spent:.3f} of {args.budget}")
    return {"test_acc": acc, "budget_spent": spent}


if __name__ == "__main__":
    main()
