"""cce_patch: Cut Cross-Entropy for Hugging Face Transformers.

The language-model loss computed from the final hidden states and ``lm_head.weight`` in fused kernels,
so the ``[tokens x vocab]`` logit matrix is never materialized.
"""

from .config import CCEConfig
from .models import is_patched, patch, unpatch
from .ops import TokenStats, linear_cross_entropy, linear_log_probs

__version__ = "0.1.0"

__all__ = ["linear_cross_entropy", "linear_log_probs", "TokenStats", "patch", "unpatch", "is_patched", "CCEConfig", "__version__"]
