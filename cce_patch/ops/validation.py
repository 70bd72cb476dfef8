"""Input checks for ``linear_cross_entropy``, run once at the API boundary before any kernel launch.

A fused kernel that reads a bad index does not fail politely: it reads or writes memory it does not own.
Every check here turns such a case into a Python error that says what is wrong.
"""

from __future__ import annotations

import torch

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_REDUCTIONS = ("mean", "sum", "none")
IMPLS = ("auto", "triton", "torch")
MODES = ("memory", "speed")


def validate_inputs(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None,
    ignore_index: int,
    softcap: float | None,
    reduction: str,
    shift: bool,
    label_smoothing: float,
    impl: str,
    check_targets: bool,
    mode: str = "memory",
    return_lse: bool = False,
    speed_chunk_bytes: int | None = None,
) -> None:
    """Raise ``ValueError``/``TypeError`` with a clear message for any input the op cannot handle."""
    if not isinstance(e, torch.Tensor) or not isinstance(c, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError("linear_cross_entropy expects tensors for e, c and targets")
    if e.dim() < 2:
        raise ValueError(f"e must have shape (..., D) with at least 2 dims, got {tuple(e.shape)}")
    if c.dim() != 2:
        raise ValueError(f"c (the classifier, e.g. lm_head.weight) must have shape (V, D), got {tuple(c.shape)}")
    if e.shape[-1] != c.shape[1]:
        raise ValueError(
            f"hidden size mismatch: e has D={e.shape[-1]} but c has shape {tuple(c.shape)} (expected (V, {e.shape[-1]}))"
        )
    if tuple(targets.shape) != tuple(e.shape[:-1]):
        raise ValueError(
            f"targets must have shape e.shape[:-1] = {tuple(e.shape[:-1])}, got {tuple(targets.shape)}"
        )
    if e.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"e must be float32, float16 or bfloat16, got {e.dtype}")
    if c.dtype != e.dtype:
        raise TypeError(f"e and c must have the same dtype, got e: {e.dtype}, c: {c.dtype}")
    if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"targets must be an integer tensor (class indices), got {targets.dtype}")
    if c.device != e.device or targets.device != e.device:
        raise ValueError(
            f"e, c and targets must be on the same device, got e: {e.device}, c: {c.device}, targets: {targets.device}"
        )
    if bias is not None:
        if bias.shape != (c.shape[0],):
            raise ValueError(f"bias must have shape (V,) = ({c.shape[0]},), got {tuple(bias.shape)}")
        if bias.device != e.device:
            raise ValueError(f"bias must be on {e.device}, got {bias.device}")
        if bias.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"bias must be a float tensor, got {bias.dtype}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "speed":
        _check_speed_mode(e.dtype, reduction, return_lse, softcap, label_smoothing, speed_chunk_bytes)
    if softcap is not None and not (softcap > 0):
        raise ValueError(f"softcap must be a positive number or None, got {softcap!r}")
    if not (0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    if shift and e.dim() < 2:
        raise ValueError("shift=True needs a sequence dimension: e must be (..., T, D)")
    if c.shape[0] == 0 or c.shape[1] == 0:
        raise ValueError(f"c must have at least one class and one feature, got shape {tuple(c.shape)}")
    if check_targets and targets.numel() > 0:
        _check_target_range(targets, c.shape[0], ignore_index)


def _check_speed_mode(dtype, reduction, return_lse, softcap, label_smoothing, speed_chunk_bytes) -> None:
    """What mode="speed" needs: a scalar loss whose per-row weights are known in the forward pass, a dtype
    whose exponent range holds unnormalised probabilities, and rank-one label-smoothing terms."""
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"mode='speed' forms the gradients in the forward pass, which needs a scalar loss "
            f"(reduction='mean' or 'sum'), got reduction={reduction!r}; use mode='memory'"
        )
    if return_lse:
        raise ValueError("mode='speed' cannot return a differentiable LSE (its gradient is unknown in the forward "
                         "pass); use mode='memory' with return_lse=True")
    if dtype == torch.float16:
        raise TypeError("mode='speed' needs bf16 or fp32 inputs: it stores unnormalised probabilities, which "
                        "overflow fp16's range; use mode='memory' for fp16")
    if softcap is not None and label_smoothing > 0:
        raise ValueError("mode='speed' does not combine softcap with label_smoothing (the smoothing term is "
                         "then no longer rank one); use mode='memory'")
    if speed_chunk_bytes is not None and int(speed_chunk_bytes) <= 0:
        raise ValueError(f"speed_chunk_bytes must be a positive number of bytes, got {speed_chunk_bytes!r}")


def _check_target_range(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Every target is in [0, V) or equals ignore_index. One small reduction (and a host sync on GPU), in as
    few launches as possible: the GPU idles from here until the op's first kernel, and on a GPU each small
    op costs more host time than device time."""
    lo, hi = torch.aminmax(targets.masked_fill(targets == ignore_index, 0))
    lo, hi = torch.stack((lo, hi)).tolist()
    if lo < 0 or hi >= vocab:
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
        first = targets[bad][0].item()
        raise ValueError(
            f"targets contain {int(bad.sum())} value(s) outside [0, {vocab}) that are not ignore_index={ignore_index} "
            f"(first: {first}). Check the tokenizer's vocabulary against the model's lm_head."
        )
