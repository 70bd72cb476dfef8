"""Input checks for ``linear_cross_entropy``, run once at the API boundary before any kernel launch.

A fused kernel that reads a bad index does not fail politely: it reads or writes memory it does not own.
Every check here turns such a case into a Python error that says what is wrong.
"""

from __future__ import annotations

import torch

from .options import (
    IMPLS,
    MODES,
    REDUCTIONS,
    check_choice,
    check_flag,
    check_ignore_index,
    check_label_smoothing,
    check_softcap,
    check_speed_chunk_bytes,
    speed_mode_problem,
)

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
    read_values: bool = True,
) -> None:
    """Raise ``ValueError``/``TypeError`` with a clear message for any input the op cannot handle.

    Checks everything that is known without reading tensor values, then (``check_targets``) the target
    range, which reads them: one reduction and, on a GPU, a host sync. Under ``torch.compile`` the op passes
    ``read_values=False`` here and checks the range inside its custom op instead (``compiled.py``), where
    the values exist."""
    for name, value in (("e", e), ("c", c), ("targets", targets)):
        _check_tensor(name, value)
    if bias is not None:
        _check_tensor("bias", bias, " or None")
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
        raise TypeError(
            f"e and c must have the same dtype, got e: {e.dtype}, c: {c.dtype} (as F.linear requires; under "
            "torch.autocast both are cast to the autocast dtype, see cce_patch/ops/autocast.py)"
        )
    if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"targets must be an integer tensor (class indices), got {targets.dtype}")
    if c.device != e.device or targets.device != e.device:
        raise ValueError(
            f"e, c and targets must be on the same device, got e: {e.device}, c: {c.device}, targets: {targets.device}"
        )
    if e.is_meta:
        raise ValueError(
            "e, c and targets are meta tensors (shapes without data): linear_cross_entropy computes a loss from "
            "values; materialize the model on a real device first"
        )
    if bias is not None:
        if bias.shape != (c.shape[0],):
            raise ValueError(f"bias must have shape (V,) = ({c.shape[0]},), got {tuple(bias.shape)}")
        if bias.device != e.device:
            raise ValueError(f"bias must be on {e.device}, got {bias.device}")
        if bias.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"bias must be a float tensor, got {bias.dtype}")
    check_ignore_index(ignore_index)
    for name, flag in (("shift", shift), ("return_lse", return_lse), ("check_targets", check_targets)):
        check_flag(name, flag)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("impl", impl, IMPLS)
    check_choice("mode", mode, MODES)
    check_softcap(softcap)
    check_label_smoothing(label_smoothing)
    check_speed_chunk_bytes(speed_chunk_bytes)
    if mode == "speed":
        problem = speed_mode_problem(e.dtype, reduction, return_lse, softcap, label_smoothing)
        if problem is not None:
            raise problem.error(problem.message)
    if shift and e.dim() < 2:
        raise ValueError("shift=True needs a sequence dimension: e must be (..., T, D)")
    if c.shape[0] == 0 or c.shape[1] == 0:
        raise ValueError(f"c must have at least one class and one feature, got shape {tuple(c.shape)}")
    if check_targets and read_values:
        check_scored_targets(targets, c.shape[0], ignore_index, targets.shape[-1] if shift else 0)


def _check_tensor(name: str, value: object, alternative: str = "") -> None:
    """``value`` is a dense tensor: a list or a sparse tensor is refused by name here rather than failing
    somewhere inside a kernel launcher."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{alternative}, got {type(value).__name__}")
    if value.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {value.layout}")


def check_scored_targets(targets: torch.Tensor, vocab: int, ignore_index: int, shift_period: int) -> None:
    """Every target the loss reads is in [0, V) or ``ignore_index``; ``targets`` may be flattened.

    Under the shift (``shift_period`` = T > 0) position 0 of each sequence is never scored (row t reads target
    t + 1): only the targets that are read are checked, as stock's shifted cross-entropy never looks at
    ``labels[..., 0]``. One small reduction and a host sync on GPU, in as few launches as possible: the GPU
    idles from here until the op's first kernel. A caller that syncs later anyway may take
    :func:`scored_targets_ok` instead and call :func:`raise_bad_targets` when it reads False."""
    extremes = _scored_extremes(targets, ignore_index, shift_period)
    if extremes is None:
        return
    lo, hi = extremes.tolist()
    if lo < 0 or hi >= vocab:
        raise_bad_targets(targets, vocab, ignore_index, shift_period)


def scored_targets_ok(targets: torch.Tensor, vocab: int, ignore_index: int, shift_period: int) -> torch.Tensor | None:
    """A 0-dim bool tensor on the targets' device, True when every scored target is in [0, V) or
    ``ignore_index`` (None when no target is scored). Not synced: on a GPU the host runs on.

    Why a deferred form: a host sync before the first kernel drains the whole queue (the model's forward) and
    leaves the GPU idle while the loss's launches are issued. The Triton speed path syncs once after its forward
    anyway (its range check) and reads no class row through an unchecked target (``fused/row_prep_kernel.py``
    counts such a row as ignored), so it reads this flag at that sync and raises before returning anything."""
    extremes = _scored_extremes(targets, ignore_index, shift_period)
    if extremes is None:
        return None
    return (extremes[0] >= 0) & (extremes[1] < vocab)


def _scored_extremes(targets: torch.Tensor, ignore_index: int, shift_period: int) -> torch.Tensor | None:
    """(2,) tensor: the smallest and largest scored target, ``ignore_index`` read as 0; None if none is scored."""
    if targets.numel() == 0 or (shift_period and shift_period < 2):
        return None
    if shift_period:
        targets = targets.reshape(-1, shift_period)[:, 1:]
    return torch.stack(torch.aminmax(targets.masked_fill(targets == ignore_index, 0)))


def raise_bad_targets(targets: torch.Tensor, vocab: int, ignore_index: int, shift_period: int) -> None:
    """The ``ValueError`` for scored targets outside [0, V): how many, and the first (error path only)."""
    if shift_period:
        targets = targets.reshape(-1, shift_period)[:, 1:]
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    first = targets[bad][0].item()
    raise ValueError(
        f"targets contain {int(bad.sum())} value(s) outside [0, {vocab}) that are not ignore_index={ignore_index} "
        f"(first: {first}). Check the tokenizer's vocabulary against the model's lm_head."
    )
