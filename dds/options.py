"""Policy options written as ``KEY=VALUE`` text: the one parser behind ``dds train -o``, ``dds bench -o``
and bench entries ``NAME[:KEY=VALUE...]``.

Values are parsed as JSON where they parse (numbers, booleans, lists), else kept as strings, so
``-o loss_weight=0.5`` gives a float and ``-o schedule=cosine`` a string.
"""
from __future__ import annotations

import json
from typing import Any, Iterable

from dds.errors import DdsError


def parse_options(pairs: Iterable[str], *, usage: str = "--option takes KEY=VALUE") -> dict[str, Any]:
    """``["k=v", ...]`` -> ``{"k": v}``.

    Args:
        pairs: ``KEY=VALUE`` strings; a later key wins.
        usage: the start of the error message, saying how options are written where these came from.

    Raises:
        DdsError: a pair without ``=`` or without a key: ``"{usage}, got '{pair}'"``.
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise DdsError(f"{usage}, got '{pair}'")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def parse_entry(entry: str) -> tuple[str, dict[str, Any]]:
    """A bench entry ``"infobatch:prune_ratio=0.8"`` -> ``("infobatch", {"prune_ratio": 0.8})``.

    Raises:
        DdsError: an option not written ``KEY=VALUE``, or no policy name.
    """
    name, *pairs = entry.strip().split(":")
    options = parse_options(pairs, usage=f"bench entry '{entry}': options are written NAME:KEY=VALUE")
    if not name:
        raise DdsError(f"bench entry '{entry}' has no policy name")
    return name, options


def parse_policy_options(pairs: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``dds bench -o``: ``["dds.warmup_epochs=0", ...]`` -> ``{"dds": {"warmup_epochs": 0}}``.

    Raises:
        DdsError: a pair not written ``POLICY.KEY=VALUE``.
    """
    per_policy: dict[str, dict[str, Any]] = {}
    for key, value in parse_options(pairs).items():
        policy, dot, opt = key.partition(".")
        if not dot or not policy or not opt:
            raise DdsError(f"bench --option takes POLICY.KEY=VALUE, got '{key}'; e.g. -o dds.warmup_epochs=0")
        per_policy.setdefault(policy, {})[opt] = value
    return per_policy
