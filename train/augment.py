"""Augmentation registry (torchvision.transforms.v2 on uint8 tensors) and per-sample seeding.

The selector's plan gives every planned sample an augmentation code: 0 = ``base``; ``k`` in
``1..AUG_LEVELS`` = ``strong`` at magnitude ``k / AUG_LEVELS`` (:func:`code_magnitude`). Augmentations
are defined per sample on uint8 ``(C, H, W)`` CPU tensors; :meth:`Augmenter.batch` runs a batch's
crops, flips and affine operations together with the same pixels; normalisation with the dataset
mean/std runs afterwards on the whole batch (:func:`normalize`), on the device.

``strong`` is TrivialAugment's recipe (one operation drawn uniformly per sample, its strength drawn
uniformly; Muller & Hutter, ICCV 2021) over an operation list that fits the data, with the strength
drawn up to the sample's magnitude instead of up to a fixed maximum: geometric operations (rotate,
translate, shear), brightness, contrast, cutout and identity for every image, plus saturation and
hue for colour images (on greyscale images colour operations are no-ops or noise).

Randomness is passed, never global: each planned sample gets a seed derived from
``(seed, epoch, position in the plan)`` (:func:`epoch_aug_seeds`), and every random parameter of its
transform is drawn from a ``torch.Generator`` of its own seeded with it. So an epoch's augmented
batches are a pure function of (seed, epoch, plan), whatever the batch composition, process count or
thread: the cached and streaming loaders agree, the trainer's prefetching thread yields the batches
the training thread would have built, and a resumed run repeats an uninterrupted one exactly.

torchvision's v2 transforms draw from torch's one global generator, shared by every thread, and take
no generator. :func:`apply_seeded` therefore draws each transform's parameters itself, from the
sample's generator, in the order and with the calls the transform's ``make_params`` makes, and hands
them to the transform's own kernel (``transform(image, params)``). A fresh generator seeded with
``s`` yields the stream the global one yields after ``manual_seed(s)``, so the images are those of
``manual_seed(s); transform(image)`` bit for bit (tested in tests/test_train.py), and the global
generator is never read nor advanced. The transforms it knows are listed in :data:`SEEDED`.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torchvision.transforms import v2

from dds.errors import DdsError
from dds.registry import Registry
from dds.selector import AUG_LEVELS

try:   # torchvision's own affine matrix and grid, so the batched affine views are its pixels
    from torchvision.transforms.v2.functional._geometry import _affine_grid
    from torchvision.transforms.v2.functional._geometry import _get_inverse_affine_matrix as _inverse_affine_matrix
except ImportError:   # another torchvision layout: affine strong views run per sample
    _affine_grid = _inverse_affine_matrix = None

AUGMENTS: Registry[Callable[[torch.Tensor], torch.Tensor]] = Registry("augmentation")
AUG_NAMES = ("base", "strong")  # plan.aug 0 -> base; codes >= 1 -> strong
_AUG_STREAM = 0xA06  # separates the augmentation seed stream from other streams of the same seed

Transform = Callable[[torch.Tensor], torch.Tensor]


def register_augment(name: str) -> Callable:
    """Decorator registering ``fn(image_size, channels, magnitude) -> transform`` under ``name``.

    The transform is built from ``v2.Compose``, ``v2.RandomChoice`` and the transforms in
    :data:`SEEDED`, whose random parameters :class:`Augmenter` draws from each sample's own generator.
    """
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
        for name, t in zip([base_name] + [strong_name] * AUG_LEVELS, self.transforms):  # every level, not only the first
            for kind in _unseeded(t):
                raise DdsError(f"augmentation '{name}' uses {kind.__name__}, whose random parameters dds cannot "
                               "draw per sample; build it from v2.Compose, v2.RandomChoice and "
                               f"{', '.join(sorted(c.__name__ for c in SEEDED))}")
        # the shipped strong views of small images: crop + flip batched with base's, then one op per level
        self._choices = None
        if self._pad and strong_name == "strong":
            self._choices = [None] + [(t.transforms[-1], torch.tensor(t.transforms[-1].p)) for t in self.transforms[1:]]
        self._affine_ok = self._choices is not None and _affine_grid is not None and all(
            v2.InterpolationMode(op.interpolation) == v2.InterpolationMode.NEAREST and op.fill == 0 and op.center is None
            for choice, _ in self._choices[1:] for op in choice.transforms if type(op) is v2.RandomAffine)

    def batch(self, images: torch.Tensor, codes: np.ndarray, seeds: np.ndarray) -> torch.Tensor:
        """Augment a batch (uint8 ``(B, C, H, W)``): sample ``i`` with ``codes[i]`` under ``seeds[i]``.

        Bit for bit ``torch.stack([self(images[i], codes[i], seeds[i]) for i in range(B)])``, but faster
        for small images (<= 32 px) under the shipped ``base``/``strong`` pair, the usual case:
        - every sample's crop (2-px padding) and flip run as one gather over the whole batch, with the
          parameters drawn from each sample's seed as torchvision would draw them
          (:func:`crop_flip_params`);
        - a strong sample then draws its operation and that operation's parameters from the same
          generator, and the affine operations (rotate, translate, shear) of the whole batch run as
          one ``grid_sample`` (:func:`affine_batch`); the others run per sample.
        Other pairs, and larger images, run per sample. ``benchmarks/augment_speed.py`` times both paths
        (28 px grey, one thread: 18 against 46 us a base view, about 100 against 210 a strong one).
        """
        codes, seeds = np.asarray(codes), np.asarray(seeds)
        if not self._pad:
            out = torch.empty_like(images)
            for i in range(codes.shape[0]):
                out[i] = self(images[i], int(codes[i]), int(seeds[i]))
            return out
        ops: dict[int, tuple[Any, dict[str, Any]]] = {}   # strong samples: their operation and its parameters

        def draw_op(i: int, gen: torch.Generator) -> None:   # continues the stream where the crop and flip left it
            if codes[i]:
                choice, p = self._choices[int(codes[i])]
                op = choice.transforms[int(torch.multinomial(p, 1, generator=gen))]
                params = SEEDED[type(op)](op, images[i], gen)
                if params is not None:
                    ops[i] = op, params

        shipped = self._choices is not None
        out = padded_crop_flip(images, *crop_flip_params(seeds, 2 * self._pad + 1, then=draw_op if shipped else None),
                               pad=self._pad)
        if not shipped:   # a strong augmentation of another make: per sample, from the raw image
            for i in np.flatnonzero(codes).tolist():
                out[i] = self(images[i], int(codes[i]), int(seeds[i]))
            return out
        together = [i for i, (op, _) in ops.items() if self._affine_ok and type(op) is v2.RandomAffine]
        for i in ops.keys() - set(together):
            op, params = ops[i]
            out[i] = op.transform(out[i], params)
        if together:   # the batch's affine operations in one grid_sample
            at = torch.tensor(together)
            out[at] = affine_batch(out[at], [ops[i][1] for i in together])
        return out

    def __call__(self, image: torch.Tensor, code: int, seed: int) -> torch.Tensor:
        """Augment ``image`` (uint8 ``(C, H, W)``) with the transform of ``code``, seeded by ``seed``.

        Thread-safe: the draws come from a generator of this call's own (see the module docstring);
        torch's global generator is neither read nor advanced.
        """
        gen = torch.Generator()
        gen.manual_seed(int(seed))
        return apply_seeded(self.transforms[int(code)], image, gen)


def affine_batch(images: torch.Tensor, params: list[dict[str, Any]]) -> torch.Tensor:
    """uint8 ``(B, C, H, W)``, each image under its own ``v2.RandomAffine`` parameters (nearest
    interpolation, fill 0, centre of the image): the pixels of ``F.affine`` on each image alone. Each
    sampling grid is torchvision's own (its matrix and grid functions, one image at a time, so every
    coordinate rounds as there); the images are then sampled in one ``grid_sample`` for the batch,
    with a mask channel marking what falls outside, as its tensor kernel does."""
    b, c, h, w = images.shape
    grid = torch.cat([_affine_grid(torch.tensor(_inverse_affine_matrix(
        [0.0, 0.0], float(p["angle"]), [float(t) for t in p["translate"]], float(p["scale"]),
        [float(v) for v in p["shear"]]), dtype=torch.float32).reshape(1, 2, 3), w=w, h=h, ow=w, oh=h) for p in params])
    sampled = torch.nn.functional.grid_sample(torch.cat([images.float(), torch.ones(b, 1, h, w)], dim=1), grid,
                                              mode="nearest", padding_mode="zeros", align_corners=False)
    img, mask = sampled[:, :c], sampled[:, c:]
    return torch.where(mask < 0.5, torch.zeros(()), img).round_().to(torch.uint8)


def crop_flip_params(seeds: np.ndarray, span: int, then: Callable[[int, torch.Generator], None] | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(top, left, flip)`` of ``base``'s padded crop + flip for each seed: what ``v2.RandomCrop`` (two
    ``randint(0, span)`` draws) and ``v2.RandomHorizontalFlip`` (flip when ``rand(1) < 0.5``) draw, in
    that order, from a generator seeded with the sample's seed. ``then(i, generator)``, when given, is
    called right after sample ``i``'s draws, so a transform that follows the flip (``strong``'s
    operation) continues the same stream."""
    n = len(seeds)
    top, left, flip = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, bool)
    gen = torch.Generator()
    for i, s in enumerate(np.asarray(seeds).tolist()):
        gen.manual_seed(int(s))
        top[i] = _randint(gen, span)
        left[i] = _randint(gen, span)
        flip[i] = bool(torch.rand(1, generator=gen) < 0.5)
        if then is not None:
            then(i, gen)
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


def _unseeded(t: Any) -> Iterator[type]:
    """The types inside transform ``t`` that :func:`apply_seeded` cannot draw the parameters of."""
    if isinstance(t, (v2.Compose, v2.RandomChoice)):
        for sub in t.transforms:
            yield from _unseeded(sub)
    elif type(t) not in SEEDED:
        yield type(t)


def apply_seeded(t: Any, image: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``t(image)`` with every random parameter drawn from ``gen``: what ``t(image)`` returns after
    ``torch.manual_seed(s)`` when ``gen`` is seeded with ``s``. ``t`` is a v2 ``Compose``/``RandomChoice``
    of the transforms in :data:`SEEDED`."""
    if isinstance(t, v2.Compose):
        for sub in t.transforms:
            image = apply_seeded(sub, image, gen)
        return image
    if isinstance(t, v2.RandomChoice):
        return apply_seeded(t.transforms[int(torch.multinomial(torch.tensor(t.p), 1, generator=gen))], image, gen)
    params = SEEDED[type(t)](t, image, gen)
    return image if params is None else t.transform(image, params)


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return torch.empty(1).uniform_(float(low), float(high), generator=gen).item()


def _randint(gen: torch.Generator, high: int) -> int:
    return int(torch.randint(0, high, size=(), generator=gen))


def _log_uniform(gen: torch.Generator, ratio: Sequence[float]) -> float:
    """An aspect ratio drawn log-uniformly from ``ratio``, in float32 as torchvision computes it."""
    low, high = torch.log(torch.tensor(ratio)).tolist()
    return torch.exp(torch.empty(1).uniform_(low, high, generator=gen)).item()


def _crop_params(t: v2.RandomCrop, image: torch.Tensor, gen: torch.Generator) -> dict[str, Any]:
    if t.pad_if_needed:
        raise DdsError("RandomCrop(pad_if_needed=True) is not supported in a seeded augmentation")
    left, right, top, bottom = t.padding or (0, 0, 0, 0)
    height, width = image.shape[-2] + top + bottom, image.shape[-1] + left + right
    crop_h, crop_w = t.size
    y = _randint(gen, height - crop_h + 1) if height > crop_h else 0
    x = _randint(gen, width - crop_w + 1) if width > crop_w else 0
    return dict(needs_crop=height > crop_h or width > crop_w, top=y, left=x, height=crop_h, width=crop_w,
                needs_pad=any((left, top, right, bottom)), padding=[left, top, right, bottom])


def _resized_crop_params(t: v2.RandomResizedCrop, image: torch.Tensor, gen: torch.Generator) -> dict[str, Any]:
    height, width = image.shape[-2:]
    for _ in range(10):
        area = height * width * _uniform(gen, *t.scale)
        ratio = _log_uniform(gen, t.ratio)
        w, h = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
        if 0 < w <= width and 0 < h <= height:
            return dict(top=_randint(gen, height - h + 1), left=_randint(gen, width - w + 1), height=h, width=w)
    in_ratio = width / height   # ten misses: the central crop, clamped to the ratio range
    w = width if in_ratio <= max(t.ratio) else int(round(height * max(t.ratio)))
    h = height if in_ratio >= min(t.ratio) else int(round(width / min(t.ratio)))
    return dict(top=(height - h) // 2, left=(width - w) // 2, height=h, width=w)


def _flip_params(t: v2.RandomHorizontalFlip, image: torch.Tensor, gen: torch.Generator) -> dict[str, Any] | None:
    return {} if torch.rand(1, generator=gen) < t.p else None


def _affine_params(t: v2.RandomAffine, image: torch.Tensor, gen: torch.Generator) -> dict[str, Any]:
    height, width = image.shape[-2:]
    angle = _uniform(gen, *t.degrees)
    translate = (0, 0)
    if t.translate is not None:
        dx, dy = float(t.translate[0] * width), float(t.translate[1] * height)
        translate = (int(round(_uniform(gen, -dx, dx))), int(round(_uniform(gen, -dy, dy))))
    scale = 1.0 if t.scale is None else _uniform(gen, *t.scale)
    shear = (0.0, 0.0)
    if t.shear is not None:
        shear = (_uniform(gen, *t.shear[:2]), _uniform(gen, *t.shear[2:]) if len(t.shear) == 4 else 0.0)
    return dict(angle=angle, translate=translate, scale=scale, shear=shear)


def _jitter_params(t: v2.ColorJitter, image: torch.Tensor, gen: torch.Generator) -> dict[str, Any]:
    order = torch.randperm(4, generator=gen)
    b, c, s, h = (None if r is None else _uniform(gen, *r) for r in (t.brightness, t.contrast, t.saturation, t.hue))
    return dict(fn_idx=order, brightness_factor=b, contrast_factor=c, saturation_factor=s, hue_factor=h)


def _erasing_params(t: v2.RandomErasing, image: torch.Tensor, gen: torch.Generator) -> dict[str, Any] | None:
    if torch.rand(1, generator=gen) >= t.p:
        return None
    channels, height, width = image.shape[-3:]
    for _ in range(10):
        area = height * width * _uniform(gen, *t.scale)
        ratio = _log_uniform(gen, t.ratio)
        h, w = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
        if h < height and w < width:
            v = (torch.empty([channels, h, w], dtype=torch.float32).normal_(generator=gen) if t.value is None
                 else torch.tensor(t.value)[:, None, None])
            return dict(i=int(torch.randint(0, height - h + 1, size=(1,), generator=gen)),
                        j=int(torch.randint(0, width - w + 1, size=(1,), generator=gen)), h=h, w=w, v=v)
    return dict(i=0, j=0, h=height, w=width, v=None)


#: the v2 transforms :func:`apply_seeded` draws the parameters of: type -> ``(t, image, gen) -> params``
#: (None: the transform does nothing this time), the draws of torchvision's own ``make_params`` (and, for
#: the random-apply transforms, its ``rand(1) >= p`` check) in the same order
SEEDED: dict[type, Callable[[Any, torch.Tensor, torch.Generator], dict[str, Any] | None]] = {
    v2.Identity: lambda t, image, gen: None,
    v2.RandomCrop: _crop_params,
    v2.RandomResizedCrop: _resized_crop_params,
    v2.RandomHorizontalFlip: _flip_params,
    v2.RandomAffine: _affine_params,
    v2.ColorJitter: _jitter_params,
    v2.RandomErasing: _erasing_params,
}


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
