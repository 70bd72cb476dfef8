"""The fused linear + cross-entropy op. Imports torch (and Triton lazily), never transformers.

Files, by role: ``api.py`` (the public op), ``options.py`` (option ranges), ``validation.py`` (input checks),
``spec.py`` (the math and the row bookkeeping every backend shares), ``backends.py`` (the backend record and
the choice), ``memory_mode.py`` / ``speed_mode.py`` (the two autograd Functions), ``chunked_torch.py`` (the
PyTorch backend), ``precision.py`` (what fp32 means), ``fused/`` (the Triton backend).
"""

from .api import linear_cross_entropy
from .backends import resolve_impl
from .spec import LossSpec

__all__ = ["linear_cross_entropy", "resolve_impl", "LossSpec"]
