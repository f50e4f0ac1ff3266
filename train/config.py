"""The trainer's configuration: one dataclass, one comment per field, saved as json with every run."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from dds._validate import check_choice, check_fraction, check_min_int, check_positive_int
from dds.errors import DdsError

SCHEDULES = ("cosine", "constant")
DEFAULT_LR = {"sgd": 0.1, "adamw": 1e-3}  # optimiser -> the peak LR the CLI uses when --lr is not given
EVAL_SPLITS = ("test", "val")
from dds.device import DEVICES  # noqa: E402


@dataclass
class TrainConfig:
    """Everything one training run depends on (with the workspace and the dataset's shards)."""

    dataset: str  # dataset name in the workspace (as given to `dds shard --name`)
    policy: str = "dds"  # selection policy: dds, full, budgeted, random, infobatch, ucb (dds.selector.list_policies())
    budget: float = 0.5  # fraction of full-data sample-steps (epochs * N) the whole run may spend, in (0, 1]
    epochs: int = 12  # passes of the selector; each epoch trains on the samples the selector plans
    model: str = "resnet20"  # model name (dds.train.list_models()) or timm:NAME (any timm architecture, random init)
    seed: int = 0  # seeds model init, the selector and the per-epoch augmentation streams
    batch_size: int = 128  # samples per optimiser step (the last batch of an epoch may be smaller)
    optimizer: str = "sgd"  # sgd (momentum, Nesterov) or adamw (decoupled weight decay)
    lr: float | None = None  # peak learning rate; None: the optimiser's DEFAULT_LR (0.1 for sgd, 1e-3 for adamw)
    momentum: float = 0.9  # SGD momentum (Nesterov when `nesterov`); unused by adamw
    nesterov: bool = True  # Nesterov momentum; unused by adamw
    weight_decay: float = 5e-4  # weight decay, applied to every parameter (L2 for sgd, decoupled for adamw)
    label_smoothing: float = 0.1  # cross-entropy label smoothing, in [0, 1)
    schedule: str = "cosine"  # LR schedule over the run's sample-steps: cosine (to 0) or constant
    warmup: float = 0.0  # fraction of the run's sample-steps with a linear LR warm-up from 0, in [0, 1)
    encoder: str = "lite0-minilm"  # encoder whose index/scores.parquet feeds the dds policy
    policy_options: dict[str, Any] = field(default_factory=dict)  # extra keyword options for the policy
    device: str = "auto"  # auto (cuda when present, else cpu), cpu or cuda
    amp: bool = True  # bfloat16 autocast on cuda and on CPUs with AMX (1.9x on resnet20); fp32 on other CPUs
    channels_last: bool = True  # channels_last model and batches on cpu (resnet20 bare step ~1.2x faster here)
    cache: bool = True  # decode every sample once into RAM; False streams the shards every epoch ...
    decode_workers: int = 1  # ... decoding the images in this many threads (0 = in the thread reading the shards)
    eval_split: str = "test"  # split evaluated every epoch (column test_acc): test, or val to pick constants on
    eval_every: int = 1  # evaluate on eval_split every this many epochs (and always after the last)
    eval_batch_size: int = 512  # samples per evaluation batch
    num_threads: int | None = None  # torch CPU threads (None = torch's default)
    # batches a background thread assembles ahead of the training step (0 = in the training thread); None = 2 on
    # cuda, 0 on cpu (on 2 cores the thread takes cores from the model: resnet20 loop 0.945 vs 1.029 x bare step)
    prefetch: int | None = None

    def __post_init__(self) -> None:
        if self.lr is None:   # an unknown optimiser keeps None here and is refused by validate()
            self.lr = DEFAULT_LR.get(self.optimizer)

    def validate(self) -> "TrainConfig":
        """Check the values that need no registry; raises DdsError with one sentence. Returns self."""
        if not self.dataset:
            raise DdsError("no dataset given; name a dataset sharded with `dds shard`")
        check_positive_int("epochs", self.epochs)
        check_positive_int("batch_size", self.batch_size)
        check_positive_int("eval_every", self.eval_every)
        check_positive_int("eval_batch_size", self.eval_batch_size)
        check_positive_int("num_threads", self.num_threads)
        if self.prefetch is not None:
            if isinstance(self.prefetch, bool) or not isinstance(self.prefetch, int):
                raise DdsError(f"prefetch must be an integer (batches ahead, 0 = off), got {self.prefetch!r}")
            check_min_int("prefetch", self.prefetch, 0, "batches ahead, 0 = off")
        if isinstance(self.decode_workers, bool) or not isinstance(self.decode_workers, int):
            raise DdsError(f"decode_workers must be an integer (threads, 0 = none), got {self.decode_workers!r}")
        check_min_int("decode_workers", self.decode_workers, 0, "threads, 0 = decode in the reading thread")
        check_choice("optimizer", self.optimizer, tuple(DEFAULT_LR))
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("eval_split", self.eval_split, EVAL_SPLITS)
        check_choice("device", self.device, DEVICES)
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise DdsError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise DdsError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise DdsError(f"weight_decay must be >= 0, got {self.weight_decay}")
        check_fraction("label_smoothing", self.label_smoothing, allow_zero=True, allow_one=False)
        check_fraction("warmup", self.warmup, allow_zero=True, allow_one=False)
        if not isinstance(self.policy_options, dict):
            raise DdsError(f"policy_options must be a dict, got {type(self.policy_options).__name__}")
        taken = sorted(set(self.policy_options) & {"policy", "info", "epochs", "budget", "seed"})
        if taken:
            raise DdsError(f"policy option(s) {', '.join(taken)} are run settings, not policy options; "
                           "use --policy/--epochs/--budget/--seed instead")
        return self

    def to_json(self) -> str:
        """The full resolved config as a json string (stored in runs.config and the checkpoint)."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Build from a dict (json, CLI); unknown keys raise DdsError listing the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DdsError(f"unknown train config key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))
