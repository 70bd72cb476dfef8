"""The Triton backend of ``linear_cross_entropy``: fused kernels, their launchers, and the cuBLAS GEMMs.

Imported only when the Triton backend is chosen (``ops/backends.py``). Files, by role:

- ``jit_common.py``: ``@triton.jit`` pieces every kernel shares (target lookup under the shift, the logit
  tile ``softcap(e @ c.T + bias)``), so the backward recomputes exactly what the forward reduced;
- ``lse_kernel.py``: the forward kernel (per-row log-sum-exp and target logit, no logit stored; in speed mode
  it also stores the unnormalised probabilities) and its launcher;
- ``grad_kernel.py``: the logit-gradient kernel of one vocabulary chunk (memory mode's backward);
- ``row_prep_kernel.py``: speed mode's per-row preparation (counted target, exponent anchor) in one launch;
- ``tiles.py``: launch configuration (tile shapes, operand loading, compile-time flags);
- ``gemm.py``: cuBLAS products with control over where partial sums are rounded;
- ``memory_mode.py``: the backend's forward and recompute backward;
- ``speed_mode.py``: the backend's forward-with-gradients.
"""
