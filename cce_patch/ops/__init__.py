"""The fused linear + cross-entropy op. Imports torch (and Triton lazily), never transformers."""

from .api import linear_cross_entropy, resolve_impl
from .spec import LossSpec

__all__ = ["linear_cross_entropy", "resolve_impl", "LossSpec"]
