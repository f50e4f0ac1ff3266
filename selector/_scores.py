"""Scores for a training loop outside ``dds train``: from a workspace, or from the user's own image embeddings.

Both return a :class:`SampleInfo` for :class:`~dds.selector.Selector` or ``DropIn``; neither imports
torch until it is called.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from dds.errors import DdsError
from dds.selector._base import SampleInfo, encode_regions, encode_status


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
    from dds.train.data import load_sample_info
    from dds.workspace import Workspace

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
