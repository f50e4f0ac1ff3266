"""Shared type aliases."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import numpy.typing as npt

#: Sample keys, as stored in the ``samples`` table (WebDataset ``__key__``).
Keys = Sequence[str]
#: A float array; shapes are given in each docstring.
FloatArray = npt.NDArray[np.floating]
#: An integer array (labels, indices).
IntArray = npt.NDArray[np.integer]
