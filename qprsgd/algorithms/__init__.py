"""Algorithms, one module per paper (see docs/algorithms.md)."""
from .base import Algorithm, Env  # noqa: F401
from . import quantized_pr  # noqa: F401
