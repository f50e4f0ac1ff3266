"""Augmentation registry (torchvision.transforms.v2 on uint8 tensors) and per-sample seeding.

The selector's plan gives every planned sample an augmentation code: 0 = ``base``, 1 = ``strong``
(:data:`AUG_NAMES`). Augmentations run per sample on uint8 ``(C, H, W)`` CPU tensors; normalisation
with the dataset mean/std runs afterwards on the whole batch (:func:`normalize`), on the device.

Randomness is passed, never global: each planned sample gets a seed derived from
``(seed, epoch, position in the plan)`` (:func:`epoch_aug_seeds`); the transform runs with torch's
CPU generator set to that seed and the generator's previous state is restored afterwards. So an
epoch's augmented batches are a pure function of (seed, epoch, plan): the cached and streaming
loaders agree, and a resumed run repeats an uninterrupted one exactly.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torchvision.transforms import v2

from dds.registry import Registry

AUGMENTS: Registry[Callable[[torch.Tensor], torch.Tensor]] = Registry("augmentation")
AUG_NAMES = ("base", "strong")  # plan.aug code -> augmentation name
_AUG_STREAM = 0xA06  # separates the augmentation seed stream from other streams of the same seed

Transform = Callable[[torch.Tensor], torch.Tensor]


def register_augment(name: str) -> Callable:
    """Decorator registering ``fn(image_size) -> transform`` under ``name``."""
    return AUGMENTS.register(name)


def list_augments() -> list[str]:
    """Names of the registered augmentation policies."""
    return AUGMENTS.names()


def create_augment(name: str, image_size: int) -> Transform:
    """The transform ``name`` for square images of side ``image_size``: uint8 ``(C, H, W)`` in and out.

    Raises:
        DdsError: unknown ``name`` (the message lists the known ones).
    """
    return AUGMENTS.get(name)(image_size=image_size)


def _crop_flip(image_size: int) -> list[v2.Transform]:
    if image_size <= 32:  # small images: shift by up to 2 px (zero padding), as in CIFAR/MNIST recipes
        crop = v2.RandomCrop(image_size, padding=2)
    else:  # larger images: the ImageNet-style random-resized crop back to the same side
        crop = v2.RandomResizedCrop(image_size, antialias=True)
    return [crop, v2.RandomHorizontalFlip()]


@register_augment("base")
def base(image_size: int) -> Transform:
    """Random crop (2-px padding for <= 32 px, else random-resized crop) + horizontal flip."""
    return v2.Compose(_crop_flip(image_size))


@register_augment("strong")
def strong(image_size: int) -> Transform:
    """``base`` followed by TrivialAugmentWide (one random op of random strength per sample)."""
    return v2.Compose([*_crop_flip(image_size), v2.TrivialAugmentWide()])


def epoch_aug_seeds(seed: int, epoch: int, m: int) -> np.ndarray:
    """One augmentation seed per planned position of an epoch.

    Returns:
        ``(m,)`` int64 seeds in ``[0, 2**62)``; a pure function of ``(seed, epoch)``, and a prefix
        of the same call with a larger ``m``.
    """
    rng = np.random.default_rng([_AUG_STREAM, seed, epoch])
    return rng.integers(0, 2**62, size=m, dtype=np.int64)


class Augmenter:
    """Applies the augmentation named by a plan code to one sample, under that sample's seed.

    Args:
        image_size: side of the (square) images.
        names: augmentation name for each plan code (default ``("base", "strong")``).
    """

    def __init__(self, image_size: int, names: Sequence[str] = AUG_NAMES) -> None:
        self.transforms = [create_augment(n, image_size) for n in names]

    def __call__(self, image: torch.Tensor, code: int, seed: int) -> torch.Tensor:
        """Augment ``image`` (uint8 ``(C, H, W)``) with the transform of ``code``, seeded by ``seed``."""
        gen = torch.default_generator
        state = gen.get_state()  # v2 draws from torch's CPU generator: seed it, then put it back
        try:
            gen.manual_seed(int(seed))
            return self.transforms[int(code)](image)
        finally:
            gen.set_state(state)


def normalize(images: torch.Tensor, mean: Sequence[float] | torch.Tensor,
              std: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, C, H, W)`` -> float32 ``(B, C, H, W)``, scaled to [0, 1] then standardised per channel.

    ``mean``/``std`` are per-channel sequences, or float32 tensors of shape ``(1, C, 1, 1)`` already on
    the images' device (what :func:`channel_stats` returns; the hot loop passes those, so no
    host-to-device copy happens per batch).
    """
    m, s = channel_stats(mean, std, images.device)
    return (images.float() / 255.0 - m) / s


def channel_stats(mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std as float32 ``(1, C, 1, 1)`` tensors on ``device`` (no copy if already there)."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return m, s
