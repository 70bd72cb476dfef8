"""The op's options and their ranges, stated once.

``linear_cross_entropy`` validates its keyword arguments with these functions and ``CCEConfig`` validates its
fields with the same ones, so an option has one range and one error message wherever it is given. Whether
speed mode applies to a call is decided here too (:func:`speed_mode_problem`): the op raises the problem, the
patched forward falls back to memory mode on it.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import NamedTuple

import torch

IMPLS = ("auto", "triton", "torch")
MODES = ("auto", "memory", "speed")  # auto: mode_choice.py picks one of the other two per shape
REDUCTIONS = ("mean", "sum", "none")


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else ValueError naming the option."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value  # type: ignore[return-value]


def check_flag(name: str, value: object) -> bool:
    """A real ``bool``: a truthy stand-in (``"no"``, a tensor, ``None``) would silently pick a branch."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_ignore_index(value: object) -> int:
    """The target value that marks an ignored position: a Python (or NumPy) integer in int64's range.

    Not a tensor: it is compared with every target inside the kernels, as a launch argument, so a tensor
    would need a host sync to read; ``None`` is not "ignore nothing" (pass a value no target takes)."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        hint = " (pass int(ignore_index))" if isinstance(value, torch.Tensor) else ""
        raise TypeError(f"ignore_index must be an int, got {type(value).__name__} {value!r}{hint}")
    value = int(value)
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {value}")
    return value


def check_softcap(value: object) -> float | None:
    """A finite positive cap, or None (no soft cap)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Real) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"softcap must be a positive finite number or None, got {value!r}")
    return float(value)


def check_label_smoothing(value: object) -> float:
    """A smoothing factor in [0, 1], as ``torch.nn.functional.cross_entropy`` accepts."""
    if isinstance(value, bool) or not isinstance(value, Real) or not (0.0 <= value <= 1.0):
        raise ValueError(f"label_smoothing must be a number in [0, 1], got {value!r}")
    return float(value)


def check_speed_chunk_bytes(value: object) -> int | None:
    """Speed mode's chunk budget: a positive int of bytes, or None for the default."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"speed_chunk_bytes must be a positive number of bytes (an int) or None, got {value!r}")
    return value


class SpeedModeProblem(NamedTuple):
    """Why speed mode cannot compute a call: the exception a call that asks for it raises, the reason, and
    the advice (a mode or option that can). Callers that only route the call read the reason alone."""

    error: type[Exception]
    reason: str
    advice: str

    @property
    def message(self) -> str:
        return f"{self.reason}; use {self.advice}"


def speed_mode_problem(
    dtype: torch.dtype, reduction: str, return_lse: bool, softcap: float | None, label_smoothing: float
) -> SpeedModeProblem | None:
    """Why ``mode="speed"`` cannot compute this call, or None when it can.

    Speed mode forms the gradients in the forward pass, so it needs a scalar loss whose per-row weights are
    known there, a dtype whose exponent range holds unnormalised probabilities, and rank-one label-smoothing
    terms."""
    if reduction not in ("mean", "sum"):
        return SpeedModeProblem(ValueError, (
            f"mode='speed' forms the gradients in the forward pass, which needs a scalar loss "
            f"(reduction='mean' or 'sum'), got reduction={reduction!r}"), "mode='memory'")
    if return_lse:
        return SpeedModeProblem(ValueError, (
            "mode='speed' cannot return a differentiable LSE (its gradient is unknown in the forward pass)"),
            "mode='memory' with return_lse=True")
    if dtype == torch.float16:
        return SpeedModeProblem(TypeError, (
            "mode='speed' needs bf16 or fp32 inputs: it stores unnormalised probabilities, which overflow fp16's "
            "range (fp16 hidden states)"), "mode='memory' for fp16")
    if softcap is not None and label_smoothing > 0:
        return SpeedModeProblem(ValueError, (
            "mode='speed' does not combine softcap with label_smoothing (the smoothing term is then no longer "
            "rank one)"), "mode='memory'")
    return None
