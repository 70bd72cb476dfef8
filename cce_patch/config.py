"""CCEConfig: how a patched model computes its loss. One frozen object, stored on the patched model.

Keeping options on the model (never in a module global) lets two differently configured models coexist, and
makes ``patch(model, impl="torch")`` after ``patch(model)`` simply replace the object.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from .ops.validation import IMPLS, MODES


@dataclass(frozen=True)
class CCEConfig:
    """Options of the patched forward.

    Attributes:
        impl: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"triton"`` or ``"torch"``.
        train_only: use CCE only while ``model.training`` (and when the Trainer asks for loss only through
            ``skip_logits``); evaluation otherwise runs the stock forward and returns logits as usual.
        return_logits: on the CCE path, also compute and return the logits (costs the memory CCE saves; for
            users whose code reads ``outputs.logits`` during training).
        check_targets: validate label values against the vocabulary before the kernel (one host sync).
        label_smoothing: as in ``torch.nn.functional.cross_entropy``, applied inside the kernel. Stock
            transformers models have no such option (the Trainer's ``label_smoothing_factor`` smooths the
            logits outside the model, which a patched model does not return), so this is where it goes.
        mode: ``"memory"`` (default: the backward recomputes the logits; memory ~1.25x the head's gradients)
            or ``"speed"`` (gradients formed in the forward pass: one GEMM fewer, ~2 GiB more memory; see
            ``linear_cross_entropy``). Speed mode needs bf16/fp32 hidden states: with an fp16 model the
            patched forward uses the memory mode and logs a warning once.
        speed_chunk_bytes: speed mode's chunk budget in bytes (None: the op's default, 2 GiB).
    """

    impl: str = "auto"
    train_only: bool = True
    return_logits: bool = False
    check_targets: bool = True
    label_smoothing: float = 0.0
    mode: str = "memory"
    speed_chunk_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.impl not in IMPLS:
            raise ValueError(f"CCEConfig.impl must be one of {IMPLS}, got {self.impl!r}")
        for name in ("train_only", "return_logits", "check_targets"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"CCEConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.mode not in MODES:
            raise ValueError(f"CCEConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.speed_chunk_bytes is not None and not (
            isinstance(self.speed_chunk_bytes, int) and self.speed_chunk_bytes > 0
        ):
            raise ValueError(f"CCEConfig.speed_chunk_bytes must be a positive int or None, got {self.speed_chunk_bytes!r}")
        if not 0.0 <= float(self.label_smoothing) < 1.0:
            raise ValueError(f"CCEConfig.label_smoothing must be in [0, 1), got {self.label_smoothing!r}")

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> CCEConfig:
        """Build from a plain dict (YAML / JSON / CLI), refusing keys that are not options."""
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown CCE option(s) {unknown}; valid options: {sorted(known)}")
        return cls(**options)

    def replace(self, **changes: Any) -> CCEConfig:
        """A copy with ``changes`` applied (unknown keys refused)."""
        return CCEConfig.from_dict({**dataclasses.asdict(self), **changes})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
