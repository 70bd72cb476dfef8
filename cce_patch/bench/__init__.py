"""Benchmarks: ``python -m cce_patch.bench`` (kernel level, ours vs torch / torch.compile / peers) and
``python -m cce_patch.bench.e2e`` (a training step of a real architecture, stock vs patched, and with
Liger-Kernel; the package ``e2e/``).

Submodules: ``regimes`` (synthetic inputs), ``methods`` (the losses compared), ``timing`` / ``memory`` (how
they are measured), ``accuracy`` (fp32 ground truth for the error columns), ``runner`` (the loop), ``report``
(table / JSON / PNG).
"""

from .regimes import REGIMES, describe, make_inputs

__all__ = ["REGIMES", "describe", "make_inputs"]
