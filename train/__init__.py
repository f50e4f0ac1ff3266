"""dds.train: the trainer, its model and augmentation registries, and the shard loader.

Importing this package imports torch; ``dds.train.config`` alone does not.
"""
from dds.train.augment import create_augment, list_augments, normalize, register_augment
from dds.train.config import TrainConfig
from dds.train.data import load_sample_info, open_split
from dds.train.loop import load_trained, lr_at, resume_train, run_train
from dds.train.models import create_model, list_models, register_model

__all__ = [
    "TrainConfig",
    "create_augment",
    "create_model",
    "list_augments",
    "list_models",
    "load_sample_info",
    "load_trained",
    "lr_at",
    "normalize",
    "open_split",
    "register_augment",
    "register_model",
    "resume_train",
    "run_train",
]
