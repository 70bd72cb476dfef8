"""What "fp32" means for the op: IEEE fp32 products unless the user opted into TF32 through torch's switch.

One switch governs our kernels' tiles and products, the cuBLAS GEMMs of both backends, and which backend
``impl="auto"`` picks for fp32 on a GPU (``api.resolve_impl``), so a user who sets it once gets the same
precision everywhere, as with plain torch.
"""

from __future__ import annotations

import torch


def fp32_uses_tf32() -> bool:
    """Whether fp32 inputs may use TF32 tensor cores: only when the user opted in through torch's own switch
    (``torch.backends.cuda.matmul.allow_tf32 = True`` or ``torch.set_float32_matmul_precision("high")``).
    Off by default, as in torch: fp32 means IEEE fp32 products, ~8x slower on an H100 than bf16 tensor cores,
    and TF32 rounds the operands to 10 mantissa bits."""
    return bool(torch.backends.cuda.matmul.allow_tf32)


def is_ieee_fp32(dtype: torch.dtype) -> bool:
    """fp32 inputs whose products must be IEEE fp32 (no TF32)."""
    return dtype == torch.float32 and not fp32_uses_tf32()
