"""cce_patch: Cut Cross-Entropy for Hugging Face Transformers.

The language-model loss computed from the final hidden states and ``lm_head.weight`` in fused kernels,
so the ``[tokens x vocab]`` logit matrix is never materialized.
"""

from .config import CCEConfig
from .integrations import trl_hook
from .models import is_patched, patch, unpatch
from .ops import TokenStats, linear_cross_entropy, linear_log_probs

__version__ = "0.1.0"

# TRL's trainers install their own fused LM head; armed here, a patched model's head runs our kernel there
# (cce_patch/integrations/trl.py). Nothing is imported until TRL itself is.
trl_hook.install()

__all__ = ["linear_cross_entropy", "linear_log_probs", "TokenStats", "patch", "unpatch", "is_patched", "CCEConfig", "__version__"]
