"""Checks on user input, done once at the public boundary; each raises DdsError with one sentence."""
from __future__ import annotations

import re

from dds.errors import DdsError

#: dataset names become folder names as they are: letters, digits, '.', '_', '-', no '..'
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_fraction(name: str, value: float, *, allow_zero: bool = False, allow_one: bool = True) -> float:
    """``value`` must lie in (0, 1] (or [0, 1] / (0, 1) per the flags)."""
    lo_ok = value >= 0 if allow_zero else value > 0
    hi_ok = value <= 1 if allow_one else value < 1
    if not (lo_ok and hi_ok):
        lo = "[0" if allow_zero else "(0"
        hi = "1]" if allow_one else "1)"
        raise DdsError(f"{name} must be in {lo}, {hi}, got {value}")
    return float(value)


def check_positive_int(name: str, value: int | None) -> int | None:
    """``value`` must be a positive integer (or None)."""
    if value is not None and value < 1:
        raise DdsError(f"{name} must be a positive integer, got {value}")
    return value


def check_min_int(name: str, value: int, low: int, why: str = "") -> int:
    """``value`` must be an integer of at least ``low``."""
    if value < low:
        raise DdsError(f"{name} must be at least {low}{f' ({why})' if why else ''}, got {value}")
    return value


#: device names every stage takes: ``auto`` is CUDA when a GPU is visible, else the CPU
DEVICES = ("auto", "cpu", "cuda")


def check_device(value: str, name: str = "--device") -> str:
    """``value`` must be one of :data:`DEVICES`."""
    return check_choice(name, value, DEVICES)


def check_dataset_name(name: str) -> str:
    """``name`` must be usable as one folder name: ``[A-Za-z0-9][A-Za-z0-9._-]*``, no ``..``, at most 100 chars.

    Raises:
        DdsError: otherwise (so ``team/exp1``, ``../x`` and ``"exp a"`` are refused, not mapped to a folder).
    """
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise DdsError(f"dataset name {name!r} is not allowed: use letters, digits, '.', '_' and '-' "
                       "(starting with a letter or digit, no '/', no '..'), e.g. --name fmnist-20k")
    return name


def check_k_fits(k: int, class_counts: dict[str, int]) -> int:
    """Each sample needs ``k`` neighbours of its own class: ``k`` must be below the smallest class size.

    Args:
        class_counts: train samples per class name.

    Raises:
        DdsError: ``k`` < 1, or a class has ``k`` samples or fewer (the message gives the largest ``k`` allowed).
    """
    check_positive_int("--k", k)
    if class_counts:
        smallest = min(class_counts, key=class_counts.get)
        n = class_counts[smallest]
        if k >= n:
            raise DdsError(f"--k {k} needs more than {k} train samples in every class, but class '{smallest}' has {n}; "
                           f"use --k {max(n - 1, 1)} or less" if n > 1 else
                           f"--k {k}: class '{smallest}' has a single train sample, which has no neighbour of its class; "
                           "add samples to it or shard without it")
    return k


def check_choice(name: str, value: str, choices: list[str] | tuple[str, ...]) -> str:
    """``value`` must be one of ``choices``."""
    if value not in choices:
        raise DdsError(f"{name} must be one of {', '.join(choices)}, got '{value}'")
    return value


#: the ``scheme:`` prefixes of a SOURCE, with the form each takes (for messages)
SOURCE_SCHEMES = {"imagefolder": "imagefolder:PATH", "tar": "tar:GLOB", "csv": "csv:FILE",
                  "torchvision": "torchvision:NAME:ROOT", "hf-disk": "hf-disk:PATH"}


def parse_source(source: str) -> tuple[str, str]:
    """Split ``scheme:identifier`` (``imagefolder:PATH``, ``tar:GLOB``, ``csv:FILE``, ``torchvision:NAME:ROOT``,
    ``hf-disk:PATH``); a path ending in ``.toml`` is a manifest file, any other bare word a manifest name.

    Returns:
        ``(scheme, identifier)`` with scheme ``manifest``, ``manifest-file`` or one of :data:`SOURCE_SCHEMES`.
    """
    forms = ", ".join(SOURCE_SCHEMES.values())
    if source.endswith(".toml"):
        return "manifest-file", source
    if ":" not in source:
        if not source:
            raise DdsError(f"empty SOURCE; give a manifest name (fashion-mnist), a manifest file (.toml) or {forms}")
        return "manifest", source
    scheme, ident = source.split(":", 1)
    if scheme not in SOURCE_SCHEMES:
        raise DdsError(f"unknown source scheme '{scheme}:'; known: {forms}, a manifest name or a .toml manifest file")
    if not ident:
        raise DdsError(f"source '{source}' has no path after '{scheme}:'; use {SOURCE_SCHEMES[scheme]}")
    return scheme, ident
