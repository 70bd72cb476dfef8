"""The end-to-end benchmark: one training step of a real architecture per variant of its loss (stock, ours,
Liger-Kernel, ours with Liger's other kernels), and the largest tokens per step each fits.

Files, by role: ``build.py`` (the model and the variants, applied and undone), ``step.py`` (one forward+backward and
its random batch, shared by the next two), ``measure.py`` (one step:
loss, gradient norm, peak memory, time), ``max_tokens.py`` (the search for the largest step that fits),
``report.py`` (markdown, JSON, PNG), ``cli.py`` (``cce-patch e2e`` / ``python -m cce_patch.bench.e2e``).
"""

from .cli import main

__all__ = ["main"]
