"""dds.selector: the online selector. Every epoch it decides which samples are trained on, in what
order, with which loss weight and how strongly each is augmented.

Usage in a training loop (torch helpers live in ``dds.selector.torch``)::

    sel = Selector("dds", info, epochs=E, budget=0.5, seed=0)
    for epoch in range(E):
        plan = sel.plan(epoch)                     # EpochPlan(indices, weights, aug)
        ...train on plan.indices in order, strong augmentation of level plan.aug where > 0,
           loss = weighted_mean(per_sample_loss, weights)...
        sel.observe(indices, per_sample_losses)    # unweighted per-sample losses

In an existing PyTorch loop, ``DropIn`` does this in InfoBatch's three lines (docs/dropin.md).
Policies: ``list_policies()``; new ones are a ``Policy`` subclass under ``@register_policy(name)``.
This package imports no torch.
"""
from typing import Any

from dds.selector._base import AUG_LEVELS, EpochPlan, Policy, SampleInfo, get_policy, list_policies, register_policy
from dds.selector._scores import embedding_scores, workspace_scores
from dds.selector._selector import Selector, synthetic_info
from dds.tables import REGIONS, STATUSES, encode_regions, encode_status

# built-in policies: importing registers them
from dds.selector._simple import BudgetedConfig, FullConfig, RandomConfig  # noqa: E402
from dds.selector._infobatch import InfoBatchConfig  # noqa: E402
from dds.selector._ucb import UcbConfig  # noqa: E402
from dds.selector._dds import DdsConfig  # noqa: E402

__all__ = [
    "AUG_LEVELS", "REGIONS", "STATUSES", "SampleInfo", "EpochPlan", "Selector", "Policy", "register_policy", "list_policies",
    "get_policy", "encode_regions", "encode_status", "synthetic_info", "DropIn", "workspace_scores",
    "embedding_scores",
    "BudgetedConfig", "FullConfig", "RandomConfig", "InfoBatchConfig", "UcbConfig", "DdsConfig",
]


def __getattr__(name: str) -> Any:
    """``DropIn`` on first use: it imports torch, which ``import dds.selector`` does not."""
    if name == "DropIn":
        from dds.selector._dropin import DropIn

        return DropIn
    raise AttributeError(f"module 'dds.selector' has no attribute {name!r}")
