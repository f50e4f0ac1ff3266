"""Synthetic WebDataset shards for tests: grey squares whose brightness follows the label."""
import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def write_tar(path: Path, rows: list[tuple[str, int]], rng: np.random.Generator, size: int) -> None:
    """Write ``rows`` of ``(key, label)`` as ``key.png`` + ``key.cls`` members of a tar at ``path``."""
    with tarfile.open(path, "w") as tar:
        for key, y in rows:
            pixels = np.clip(rng.normal(40 + 50 * y, 30, (size, size)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels, "L").save(buf, "PNG")
            for ext, data in (("png", buf.getvalue()), ("cls", str(y).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
