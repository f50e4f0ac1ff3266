"""Device choice, shared by every stage: ``auto`` means CUDA when a GPU is visible, else the CPU."""
from __future__ import annotations

import functools
import os

import torch

from dds._validate import DEVICES, check_device
from dds.errors import DdsError

__all__ = ["DEVICES", "amp_allowed", "cpu_has_amx", "resolve_device", "uses_bf16"]


def resolve_device(name: str):
    """``auto`` -> cuda when present else cpu; returns a ``torch.device``.

    Raises:
        DdsError: an unknown name, or ``cuda`` asked for where no CUDA GPU is visible.
    """
    check_device(name, "device")
    if name == "cuda" and not torch.cuda.is_available():
        raise DdsError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


@functools.lru_cache(maxsize=None)  # asked every training step: the file is read once per path
def cpu_has_amx(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU has AMX bf16 tiles (the ``amx_bf16`` flag of Linux's ``/proc/cpuinfo``).

    There bf16 autocast ran ResNet-20's training step 1.9x faster than fp32 (``dds bench-train``);
    on CPUs without AMX it was several times slower, so the trainer keeps fp32 there. False where
    the file cannot be read (other systems).
    """
    try:
        with open(cpuinfo) as f:
            return any(line.startswith("flags") and "amx_bf16" in line.split() for line in f)
    except OSError:
        return False


def amp_allowed() -> bool:
    """False when the environment sets ``DDS_AMP=0``: no bf16 anywhere in dds, whatever ``--amp`` says.

    The test suite sets it (scripts/test.sh): on 2-core Xeon VMs with AMX, after a bf16 training run,
    float results in the same process went wrong from call to call (``torch.equal`` called equal
    tensors different in 4 of 14 tries, 0 of 12 after fp32 runs; once a later run's losses came out
    NaN and the run stopped as diverged).
    """
    return os.environ.get("DDS_AMP", "1") != "0"


def uses_bf16(device, amp: bool) -> bool:
    """Whether training on ``device`` (a ``torch.device``) runs under bf16 autocast: ``amp`` and either
    CUDA or a CPU with AMX (:func:`cpu_has_amx`), unless ``DDS_AMP=0`` (:func:`amp_allowed`)."""
    return bool(amp) and amp_allowed() and (device.type == "cuda" or (device.type == "cpu" and cpu_has_amx()))
