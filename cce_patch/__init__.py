"""cce_patch: Cut Cross-Entropy for Hugging Face Transformers.

The language-model loss computed from the final hidden states and ``lm_head.weight`` in fused kernels,
so the ``[tokens x vocab]`` logit matrix is never materialized.

Importing the package changes nothing outside it (no import hook, warnings filter, logging handler or torch
setting). ``patch`` is the model room's patch plus arming the TRL integration (``integrations/arming.py``), so
TRL's trainers run a patched model's fused LM head on our kernel whichever of the two is imported first.
"""

from .config import CCEConfig
from .integrations.arming import patch
from .models import is_patched, unpatch
from .ops import TokenStats, linear_cross_entropy, linear_log_probs

#: The version, in one place: pyproject.toml reads this literal from the source (setuptools, without importing
#: the package, so building needs no torch).
__version__ = "0.1.0"

__all__ = ["linear_cross_entropy", "linear_log_probs", "TokenStats", "patch", "unpatch", "is_patched", "CCEConfig", "__version__"]
