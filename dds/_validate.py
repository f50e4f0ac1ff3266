"""Checks on user input, done once at the public boundary; each raises DdsError with one sentence."""
from __future__ import annotations

from dds.errors import DdsError


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


def check_choice(name: str, value: str, choices: list[str] | tuple[str, ...]) -> str:
    """``value`` must be one of ``choices``."""
    if value not in choices:
        raise DdsError(f"{name} must be one of {', '.join(choices)}, got '{value}'")
    return value


def parse_source(source: str) -> tuple[str, str]:
    """Split ``scheme:identifier`` (``imagefolder:PATH``, ``tar:GLOB``); a bare word is a manifest name.

    Returns:
        ``(scheme, identifier)`` with scheme in ``manifest``, ``imagefolder``, ``tar``.
    """
    if ":" not in source:
        if not source:
            raise DdsError("empty SOURCE; give a manifest name (fashion-mnist), imagefolder:PATH or tar:GLOB")
        return "manifest", source
    scheme, ident = source.split(":", 1)
    if scheme not in ("imagefolder", "tar"):
        raise DdsError(f"unknown source scheme '{scheme}:'; known: imagefolder:PATH, tar:GLOB, or a manifest name")
    if not ident:
        raise DdsError(f"source '{source}' has no path after '{scheme}:'")
    return scheme, ident
