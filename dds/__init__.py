"""dds: dynamic data selection joined with data augmentation (after Yang et al., ICML 2025, arXiv 2505.03809)."""
from dds.errors import DdsError
from dds.workspace import Workspace

__all__ = ["DdsError", "Workspace", "__version__"]
__version__ = "0.1.0"
