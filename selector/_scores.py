"""Scores for a training loop: from a workspace (as ``dds train`` reads them), or from the user's own image embeddings.

All return a :class:`SampleInfo` for :class:`~dds.selector.Selector` or ``DropIn``; none imports torch.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from dds.errors import DdsError
from dds.selector._base import SampleInfo
from dds.tables import encode_regions, encode_status, load_scores
from dds.workspace import Workspace


def workspace_scores(name: str, encoder: str = "lite0-minilm", workspace: str | None = None) -> SampleInfo:
    """The scores ``dds index NAME --encoder ENCODER`` wrote, as ``dds train`` reads them.

    Index i is the i-th sample of the workspace's train split (``samples.idx``): the dataset they
    are used with must list the same images in that order.

    Args:
        name: the dataset's name in the workspace.
        encoder: the encoder the dataset was indexed with.
        workspace: the workspace folder (None: ``$DDS_WORKSPACE``, else ``./dds-work``).

    Raises:
        DdsError: no such dataset, or it has no scores under ``encoder``.
    """
    ws = Workspace.resolve(workspace).check_exists()
    info = load_sample_info(ws, name, encoder)
    if not info.has_scores:
        raise DdsError(f"dataset {name} has no scores under encoder {encoder}: run `dds embed {name} --encoder "
                       f"{encoder}` and `dds index {name} --encoder {encoder}` first")
    return info


def embedding_scores(embeddings: Any, labels: Any, num_classes: int, *, k: int = 10,
                     device: str = "cpu") -> SampleInfo:
    """Scores from image embeddings alone (no text tower): density, kNN agreement, joint, region and
    the label verdict, by :func:`dds.pipeline.index.image_scores`; ``consistency`` is the kNN agreement.

    Args:
        embeddings: ``(N, D)`` float image embeddings (numpy or torch), row i for sample i.
        labels: ``(N,)`` int labels in ``[0, num_classes)``.
        num_classes: number of classes C.
        k: neighbours per sample.
        device: ``cpu`` or ``cuda`` for the kNN search.

    Raises:
        DdsError: shapes that do not match, or non-finite embeddings.
    """
    from dds.pipeline.index import image_scores
    from dds.selector._selector import _as_numpy

    info = SampleInfo(labels=_as_numpy(labels).reshape(-1), num_classes=num_classes)   # validates the labels
    img = _as_numpy(embeddings)
    if img.ndim != 2 or img.shape[0] != info.n:
        raise DdsError(f"embeddings must have shape ({info.n}, D), one row per label, got {img.shape}")
    if not np.isfinite(img).all():
        raise DdsError("embeddings contain NaN or inf; recompute them")
    cols = image_scores(img, info.labels, info.num_classes, k=k, device=device)
    return SampleInfo(labels=info.labels, num_classes=info.num_classes, density=cols["density"],
                      consistency=cols["knn_agreement"], joint=cols["joint"], region=encode_regions(cols["region"]),
                      status=encode_status(cols["status"]), label_fixed=cols["label_fixed"])


def load_sample_info(ws: Workspace, name: str, encoder: str, *, need_scores: bool = True) -> SampleInfo:
    """The selector's static inputs for the train split of ``name``, in ``samples.idx`` order.

    Scores come from ``index/{encoder_slug(encoder)}/scores.parquet``; without that file the result has no
    scores (the selector then refuses the dds policy with its own message).

    Returns:
        ``SampleInfo``: labels int64 ``(N,)``, num_classes, and density, consistency,
        joint (float32 ``(N,)``) and region (int8 codes into ``REGIONS``) when scores exist, plus
        status and label_fixed when the scores carry the label verdict.

    Args:
        need_scores: whether the policy reads scores; if not, scores that miss samples are ignored.

    Raises:
        DdsError: scores exist but do not cover every train sample (when ``need_scores``), were
            computed for other labels (the dataset was re-sharded), or hold an unknown region.
    """
    info = ws.dataset_info(name)
    samples = ws.split_samples(name, "train", ["key", "label"])
    labels = samples["label"].to_numpy().astype(np.int64)
    num_classes = len(info["classes"])
    scores = load_scores(ws, name, encoder, ["key", "label", "density", "consistency", "joint", "region", "status",
                                             "label_fixed"])
    if scores is None:
        return SampleInfo(labels=labels, num_classes=num_classes)
    verdict = {"status", "label_fixed"} <= set(scores.columns)   # older scores lack them
    joined = samples[["key", "label"]].merge(scores, on="key", how="left", suffixes=("", "_scored"),
                                             validate="one_to_one")
    fix = f"re-run `dds index {name} --encoder {encoder}`"
    missing = joined["density"].isna()
    if missing.any():
        if not need_scores:  # policies that do not read scores train on a dataset with partial scores
            return SampleInfo(labels=labels, num_classes=num_classes)
        raise DdsError(f"scores of {name} ({encoder}) miss {int(missing.sum())} of {len(joined)} train samples; "
                       f"{fix} (samples whose images could not be embedded stay unscored: see `dds embed` output)")
    stale = int((joined["label"] != joined["label_scored"]).sum())
    if stale:
        raise DdsError(f"scores of {name} ({encoder}) were computed for other labels ({stale} samples differ, "
                       f"the dataset was re-sharded); {fix}")
    try:
        region = encode_regions(joined["region"].to_numpy())
        extra = {"status": encode_status(joined["status"].to_numpy()),
                 "label_fixed": joined["label_fixed"].to_numpy().astype(np.int64)} if verdict else {}
    except DdsError as e:
        raise DdsError(f"scores of {name} ({encoder}): {e}; {fix}") from None
    return SampleInfo(labels=labels, num_classes=num_classes,
                      density=joined["density"].to_numpy(np.float32),
                      consistency=joined["consistency"].to_numpy(np.float32),
                      joint=joined["joint"].to_numpy(np.float32), region=region, **extra)
