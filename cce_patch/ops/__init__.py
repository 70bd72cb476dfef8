"""The fused linear + cross-entropy op. Imports torch (and Triton lazily), never transformers.

Files, by role: ``api.py`` (the public op), ``options.py`` (option ranges), ``validation.py`` (input checks),
``spec.py`` (the math and the row bookkeeping every backend shares), ``backends.py`` (the backend record and
the choice), ``memory_mode.py`` / ``speed_mode.py`` (the two autograd Functions), ``chunked_torch.py`` (the
PyTorch backend), ``precision.py`` (what fp32 means), ``autocast.py`` (the autocast rule), ``compiled.py``
(the op as custom ops, for torch.compile), ``second_order.py`` (double backward refused), ``fused/`` (the
Triton backend); ``token_stats.py`` (``linear_log_probs``: per-token log-probs, entropy, accuracy, ... in the
same fused pass) and ``stats.py`` (their math).
"""

from .api import linear_cross_entropy
from .autocast import compute_dtype
from .backends import resolve_impl
from .second_order import DoubleBackwardError
from .spec import LossSpec
from .token_stats import TokenStats, linear_log_probs

__all__ = ["linear_cross_entropy", "linear_log_probs", "TokenStats", "resolve_impl", "LossSpec",
           "DoubleBackwardError", "compute_dtype"]
