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
``(seed, epoch, position in the plan)`` (:func:`epoch_aug_seeds`), and its transform draws from a
``torch.Generator`` of its own seeded with it. So an epoch's augmented batches are a pure function of
(seed, epoch, plan): the cached and streaming loaders agree, the trainer's prefetching thread
yields the batches the training thread would have built, and a resumed run repeats an
uninterrupted one exactly.

torchvision's v2 transforms take no generator: they draw from torch's one global CPU generator
(``torch.default_generator``), which every thread shares. Seeding it per sample and restoring it
afterwards (what this module did before) is therefore not thread-safe: a draw of another thread in
between (dropout in the training thread, say) would change the augmentation and be undone by the
restore. The transform instead runs under :class:`_OwnGenerator`, a ``TorchFunctionMode``; torch
keeps the stack of such modes per thread, so the mode sees only the calls of the thread that entered
it, and it hands each random draw of those calls (``torch.rand``, ``randint``, ``Tensor.uniform_``,
...) the sample's generator. A fresh generator seeded with ``s`` yields the stream the global one
yields after ``manual_seed(s)``, so the images are the same as before, bit for bit (tested against
the old recipe in tests/test_train.py); the global generator is never read nor advanced. Each
intercepted call costs a Python round trip, so the kernels of the shipped operations, whose
parameters are drawn before they run, run with the mode off (:func:`_unintercepted`): 58
intercepted calls per strong sample become 19. Measured on the 2-core CPU machine, augmentation CPU
time per 28 px sample rose from 163 to 205 us (base) and from 417 to 494 us (codes 0..4 mixed)
against the old recipe (from 775 to 1183 us with the kernels under the mode too).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.overrides import TorchFunctionMode
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
        self._pad = 2 if base_name == "base" and image_size <= 32 else 0   # batched base path (see batch)
        self.transforms = [create_augment(base_name, image_size, channels)] + [
            create_augment(strong_name, image_size, channels, magnitude=k / AUG_LEVELS)
            for k in range(1, AUG_LEVELS + 1)]
        for t in self.transforms:
            for leaf in _parts(t):
                if type(leaf) in _DETERMINISTIC_KERNELS and "transform" not in vars(leaf):
                    leaf.transform = functools.partial(_unintercepted, leaf.transform)

    def batch(self, images: torch.Tensor, codes: np.ndarray, seeds: np.ndarray) -> torch.Tensor:
        """Augment a batch (uint8 ``(B, C, H, W)``): sample ``i`` with ``codes[i]`` under ``seeds[i]``.

        Bit for bit ``torch.stack([self(images[i], codes[i], seeds[i]) for i in range(B)])``, but the
        ``base`` samples of small images (crop with 2-px padding + flip, the usual case) are cropped and
        flipped in one gather over the whole batch, with the parameters drawn from each sample's seed as
        torchvision would draw them (:func:`crop_flip_params`): 26 us a sample instead of 185 on the
        2-core CPU machine. Other codes, and larger images, run per sample.
        """
        codes = np.asarray(codes)
        fast = (codes == 0) if self._pad else np.zeros(codes.shape[0], bool)
        if fast.all():
            return padded_crop_flip(images, *crop_flip_params(seeds, 2 * self._pad + 1), pad=self._pad)
        out = torch.empty_like(images)
        if fast.any():
            idx = np.flatnonzero(fast)
            out[torch.from_numpy(idx)] = padded_crop_flip(images[torch.from_numpy(idx)],
                                                          *crop_flip_params(np.asarray(seeds)[idx], 2 * self._pad + 1),
                                                          pad=self._pad)
        for i in np.flatnonzero(~fast).tolist():
            out[i] = self(images[i], int(codes[i]), int(seeds[i]))
        return out

    def __call__(self, image: torch.Tensor, code: int, seed: int) -> torch.Tensor:
        """Augment ``image`` (uint8 ``(C, H, W)``) with the transform of ``code``, seeded by ``seed``.

        Thread-safe: the draws come from a generator of this call's own (see the module docstring);
        torch's global generator is neither read nor advanced.
        """
        gen = torch.Generator()
        gen.manual_seed(int(seed))
        with _OwnGenerator(gen):
            return self.transforms[int(code)](image)


def crop_flip_params(seeds: np.ndarray, span: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(top, left, flip)`` of ``base``'s padded crop + flip for each seed: what ``v2.RandomCrop`` (two
    ``randint(0, span)`` draws) and ``v2.RandomHorizontalFlip`` (flip when ``rand(1) < 0.5``) draw, in
    that order, from a generator seeded with the sample's seed."""
    n = len(seeds)
    top, left, flip = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, bool)
    gen = torch.Generator()
    for i, s in enumerate(np.asarray(seeds).tolist()):
        gen.manual_seed(int(s))
        top[i] = int(torch.randint(0, span, size=(), generator=gen))
        left[i] = int(torch.randint(0, span, size=(), generator=gen))
        flip[i] = bool(torch.rand(1, generator=gen) < 0.5)
    return top, left, flip


def padded_crop_flip(images: torch.Tensor, top: np.ndarray, left: np.ndarray, flip: np.ndarray, *,
                     pad: int) -> torch.Tensor:
    """Zero-pad uint8 ``(B, C, H, W)`` by ``pad`` on every side, crop ``(H, W)`` at ``(top, left)`` per
    sample and mirror the flipped ones: one gather for the whole batch."""
    b, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    rows = torch.from_numpy(top)[:, None] + torch.arange(h)                       # (B, H)
    ar = torch.arange(w)
    cols = torch.from_numpy(left)[:, None] + torch.where(torch.from_numpy(flip)[:, None], w - 1 - ar, ar)
    out = padded[torch.arange(b)[:, None, None], :, rows[:, :, None], cols[:, None, :]]   # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def _parts(t: Any) -> Iterator[Any]:
    """``t`` and the transforms inside it (v2 containers keep theirs in a plain list, ``transforms``)."""
    yield t
    for sub in getattr(t, "transforms", None) or ():
        yield from _parts(sub)


def _unintercepted(kernel: Callable, inpt: Any, params: dict[str, Any]) -> Any:
    """Run a v2 transform's kernel with torch-function modes off: its parameters were drawn before (in
    ``make_params``/``forward``, under the mode), and the mode need not see the kernel's calls (39 of
    the 58 it would intercept per strong sample)."""
    with torch._C.DisableTorchFunction():
        return kernel(inpt, params)


# v2 transforms whose ``transform`` (the kernel) draws nothing: all their randomness is drawn before
# it is called. Others (GaussianNoise draws in its kernel, say) run under the mode whole.
_DETERMINISTIC_KERNELS = frozenset([v2.RandomCrop, v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.RandomAffine,
                                    v2.ColorJitter, v2.RandomErasing, v2.Identity])

# random draws that take ``generator=``: under _OwnGenerator they get the sample's one
_DRAWS = frozenset([
    torch.rand, torch.randn, torch.randint, torch.randperm, torch.rand_like, torch.randn_like, torch.randint_like,
    torch.multinomial, torch.normal, torch.bernoulli, torch.poisson,
    torch.Tensor.uniform_, torch.Tensor.normal_, torch.Tensor.random_, torch.Tensor.bernoulli_,
    torch.Tensor.bernoulli, torch.Tensor.exponential_, torch.Tensor.geometric_, torch.Tensor.log_normal_,
    torch.Tensor.cauchy_, torch.Tensor.multinomial])
# random ops that take no generator (they would draw from the global one): refused under _OwnGenerator
_GLOBAL_ONLY = frozenset([
    torch.nn.functional.dropout, torch.nn.functional.dropout1d, torch.nn.functional.dropout2d,
    torch.nn.functional.dropout3d, torch.nn.functional.alpha_dropout, torch.nn.functional.feature_alpha_dropout,
    torch.nn.functional.rrelu, torch.nn.functional.gumbel_softmax, torch.dropout])


class _OwnGenerator(TorchFunctionMode):
    """Within ``with _OwnGenerator(gen):``, the random draws of this thread's torch calls come from ``gen``.

    torch keeps TorchFunctionModes per thread: calls of other threads are not seen (and keep the
    global generator). A draw that names its own generator keeps it.
    """

    def __init__(self, generator: torch.Generator) -> None:
        super().__init__()
        self.generator = generator

    def __torch_function__(self, func, types, args=(), kwargs=None) -> Any:
        if func in _DRAWS:
            if kwargs is None or kwargs.get("generator") is None:
                kwargs = {**(kwargs or {}), "generator": self.generator}
        elif func in _GLOBAL_ONLY:
            raise RuntimeError(f"augmentation calls {getattr(func, '__name__', func)}, which draws from torch's global "
                               "generator and takes no generator; it cannot run in a seeded, thread-safe transform")
        return func(*args, **kwargs) if kwargs else func(*args)  # the hot path: ~19 calls per strong sample


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
