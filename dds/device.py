"""Device choice, shared by every stage: ``auto`` means CUDA when a GPU is visible, else the CPU."""
from __future__ import annotations

from dds.errors import DdsError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str):
    """``auto`` -> cuda when present else cpu; returns a ``torch.device``.

    Raises:
        DdsError: an unknown name, or ``cuda`` asked for where no CUDA GPU is visible.
    """
    import torch

    from dds._validate import check_device

    check_device(name, "device")
    if name == "cuda" and not torch.cuda.is_available():
        raise DdsError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")
