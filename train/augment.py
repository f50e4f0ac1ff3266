"""Augmentation registry (torchvision.transforms.v2 on uint8 tensors) and per-sample seeding.

The selector's plan gives every planned sample an augmentation code: 0 = ``base``; ``k`` in
``1..AUG_LEVELS`` = ``strong`` at magnitude ``k / AUG_LEVELS`` (:func:`code_magnitude`). Augmentations
run per sample on uint8 ``(C, H, W)`` CPU tensors; normalisation with the dataset mean/std runs
afterwards on the whole batch (:func:`normalize`), on the device.

``strong`` is TrivialAugment's recipe (one operation drawn uniformly per sample, its strength drawn
uniformly; Muller & Hutter, ICCV 2021) over an operation list that fits the data, with the strength
drawn up to the sample's magnitude instead of up to a fixed maximum: geometric operations (rotate,
translate, shear), brightness, contrast, cutout and identity for every image, plus saturation and
hue for colour images (on greyscale images colour operations are no-ops or noise).

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
from dds.selector import AUG_LEVELS

AUGMENTS: Registry[Callable[[torch.Tensor], torch.Tensor]] = Registry("augmentation")
AUG_NAMES = ("base", "strong")  # plan.aug 0 -> base; codes >= 1 -> strong
_AUG_STREAM = 0xA06  # separates the augmentation seed stream from other streams of the same seed

Transform = Callable[[torch.Tensor], torch.Tensor]


def register_augment(name: str) -> Callable:
    """Decorator registering ``fn(image_size, channels, magnitude) -> transform`` under ``name``."""
    return AUGMENTS.register(name)


def list_augments() -> list[str]:
    """Names of the registered augmentation policies."""
    return AUGMENTS.names()


def create_augment(name: str, image_size: int, channels: int = 3, magnitude: float = 1.0) -> Transform:
    """The transform ``name`` for square images of side ``image_size``: uint8 ``(C, H, W)`` in and out.

    Args:
        channels: 1 (greyscale) or 3; decides which operations make sense.
        magnitude: in (0, 1], the largest strength of ``strong``'s operations (``base`` ignores it).

    Raises:
        DdsError: unknown ``name`` (the message lists the known ones).
    """
    return AUGMENTS.get(name)(image_size=image_size, channels=channels, magnitude=magnitude)


def code_magnitude(code: np.ndarray) -> np.ndarray:
    """Magnitude in [0, 1] of plan.aug codes (0 = base)."""
    return np.asarray(code, dtype=np.float32) / AUG_LEVELS


def _crop_flip(image_size: int) -> list[v2.Transform]:
    if image_size <= 32:  # small images: shift by up to 2 px (zero padding), as in CIFAR/MNIST recipes
        crop = v2.RandomCrop(image_size, padding=2)
    else:  # larger images: the ImageNet-style random-resized crop back to the same side
        crop = v2.RandomResizedCrop(image_size, antialias=True)
    return [crop, v2.RandomHorizontalFlip()]


@register_augment("base")
def base(image_size: int, channels: int = 3, magnitude: float = 1.0) -> Transform:
    """Random crop (2-px padding for <= 32 px, else random-resized crop) + horizontal flip."""
    return v2.Compose(_crop_flip(image_size))


def strong_ops(channels: int, magnitude: float) -> list[v2.Transform]:
    """The operations of ``strong`` at ``magnitude`` m in (0, 1]; each draws its strength uniformly up to
    its maximum times m (rotate 30 degrees, translate 30 %, shear 30 degrees, brightness and contrast
    factor 1 +- 0.9, cutout of up to 25 % of the image; colour images add saturation 1 +- 0.9 and hue
    +- 0.3)."""
    m = float(magnitude)
    ops: list[v2.Transform] = [
        v2.Identity(),
        v2.RandomAffine(degrees=30.0 * m),
        v2.RandomAffine(degrees=0.0, translate=(0.3 * m, 0.3 * m)),
        v2.RandomAffine(degrees=0.0, shear=(-30.0 * m, 30.0 * m, -30.0 * m, 30.0 * m)),
        v2.ColorJitter(brightness=0.9 * m),
        v2.ColorJitter(contrast=0.9 * m),
        v2.RandomErasing(p=1.0, scale=(0.02, 0.02 + 0.23 * m), value=0),
    ]
    if channels == 3:
        ops += [v2.ColorJitter(saturation=0.9 * m), v2.ColorJitter(hue=0.3 * m)]
    return ops


@register_augment("strong")
def strong(image_size: int, channels: int = 3, magnitude: float = 1.0) -> Transform:
    """``base`` followed by one of :func:`strong_ops` drawn uniformly (TrivialAugment's recipe)."""
    if not 0 < magnitude <= 1:
        raise ValueError(f"magnitude must be in (0, 1], got {magnitude}")
    return v2.Compose([*_crop_flip(image_size), v2.RandomChoice(strong_ops(channels, magnitude))])


def epoch_aug_seeds(seed: int, epoch: int, m: int) -> np.ndarray:
    """One augmentation seed per planned position of an epoch.

    Returns:
        ``(m,)`` int64 seeds in ``[0, 2**62)``; a pure function of ``(seed, epoch)``, and a prefix
        of the same call with a larger ``m``.
    """
    rng = np.random.default_rng([_AUG_STREAM, seed, epoch])
    return rng.integers(0, 2**62, size=m, dtype=np.int64)


class Augmenter:
    """Applies the augmentation of a plan code to one sample, under that sample's seed.

    Args:
        image_size: side of the (square) images.
        channels: image channels (1 or 3).
        names: (base, strong) augmentation names; code 0 is ``names[0]``, code k >= 1 is ``names[1]``
            at magnitude ``k / AUG_LEVELS``.
    """

    def __init__(self, image_size: int, channels: int = 3, names: Sequence[str] = AUG_NAMES) -> None:
        base_name, strong_name = names
        self.transforms = [create_augment(base_name, image_size, channels)] + [
            create_augment(strong_name, image_size, channels, magnitude=k / AUG_LEVELS)
            for k in range(1, AUG_LEVELS + 1)]

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
