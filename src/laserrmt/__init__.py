"""laserrmt: compress neural networks with Random Matrix Theory."""

from laserrmt.errors import LaserRMTError

__version__ = "0.1.0"

__all__ = ["LaserRMTError", "__version__"]
