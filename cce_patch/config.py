"""CCEConfig: how a patched model computes its loss. One frozen object, stored on the patched model.

Keeping options on the model (never in a module global) lets two differently configured models coexist, and
makes ``patch(model, impl="torch")`` after ``patch(model)`` simply replace the object. The ranges of the
options the op also takes are the op's own (``ops/options.py``), and :meth:`CCEConfig.op_options` is the one
place that turns a config into the op's keyword arguments.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass, fields
from typing import Any

import torch

from .ops.filter_order import DEFAULT_FILTER_VOCAB_ORDER, check_filter_vocab_order
from .ops.filtering import FilterCounter, check_filter_eps, filter_problem
from .ops.options import (
    IMPLS,
    MODES,
    check_choice,
    check_label_smoothing,
    check_speed_chunk_bytes,
    speed_mode_problem,
)

logger = logging.getLogger("cce_patch")


@dataclass(frozen=True)
class CCEConfig:
    """Options of the patched forward.

    Attributes:
        impl: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"triton"`` or ``"torch"``.
        train_only: use CCE only while ``model.training`` (and when the Trainer asks for loss only through
            ``skip_logits``); evaluation otherwise runs the stock forward and returns logits as usual.
        return_logits: on the CCE path, also compute and return the logits (costs the memory CCE saves; for
            users whose code reads ``outputs.logits`` during training).
        check_targets: validate label values against the vocabulary (one host sync before the kernels; the Triton
            speed path reads it at its own sync after the forward).
        label_smoothing: in [0, 1], as in ``torch.nn.functional.cross_entropy``, applied inside the kernel.
            Stock transformers models have no such option (the Trainer's ``label_smoothing_factor`` smooths the
            logits outside the model, which a patched model does not return), so this is where it goes.
        mode: ``"auto"`` (default: speed mode where it can compute the call, fits comfortably in the free
            memory and gains from it, memory mode otherwise; decided once per shape, logged once at INFO),
            ``"memory"`` (the backward recomputes the logits) or ``"speed"`` (gradients formed in the forward
            pass: one GEMM fewer, more memory; see ``linear_cross_entropy``). Where speed mode cannot compute a
            call (fp16 hidden states, softcap with label smoothing), ``"speed"`` uses memory mode and logs a
            warning once; ``"auto"`` takes memory mode without one.
        speed_chunk_bytes: speed mode's chunk budget in bytes (None: the op's default).
        filter_eps: None (exact gradients) or a number in (0, 1): gradient filtering with each row's dropped
            softmax mass at most this (see ``linear_cross_entropy`` for the bound on dE, dC and dbias). Both
            backends filter in both modes (Triton not fp16 models: the torch path then, with a warning); where the
            model's soft cap meets label smoothing the filter cannot keep its bound and the gradients stay exact (one
            warning). What it skipped accumulates in ``config.filter_counter``, which the Trainer callback logs
            as ``cce_filter_skipped_fraction``.
        filter_vocab_order: with ``filter_eps``, the order the op visits the vocabulary in: ``"mean_logit"``
            (decreasing mean logit over each call's rows, so that the low-mass entries fill whole tiles the filter
            can skip; the bound is unchanged, one extra copy of the head's weight per call), ``"natural"`` (the
            tokenizer's order: no copy, fewer tiles skip; H100, paper shape, LM-like logits, speed mode: 78.5%
            skipped and 40.0 ms against 83.9% and 35.6 ms, at 1.2 GB less; BENCHMARKS.md) or ``"auto"``
            (default: mean_logit in speed mode, natural in memory mode, which would hold the copy until its
            backward). A non-default value needs ``filter_eps``.
    """

    impl: str = "auto"
    train_only: bool = True
    return_logits: bool = False
    check_targets: bool = True
    label_smoothing: float = 0.0
    mode: str = "auto"
    speed_chunk_bytes: int | None = None
    filter_eps: float | None = None
    filter_vocab_order: str = DEFAULT_FILTER_VOCAB_ORDER

    def __post_init__(self) -> None:
        for name in ("train_only", "return_logits", "check_targets"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"CCEConfig.{name} must be a bool, got {getattr(self, name)!r}")
        try:
            check_choice("impl", self.impl, IMPLS)
            check_choice("mode", self.mode, MODES)
            check_label_smoothing(self.label_smoothing)
            check_speed_chunk_bytes(self.speed_chunk_bytes)
            check_filter_eps(self.filter_eps)
            check_filter_vocab_order(self.filter_vocab_order, self.filter_eps)
        except ValueError as exc:
            raise ValueError(f"CCEConfig.{exc}") from None
        # Not a field (it is state, not an option): what this config's filter skipped, filled by every call of
        # the patched forward; a replaced config starts a new count.
        object.__setattr__(self, "filter_counter", FilterCounter() if self.filter_eps is not None else None)

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

    def op_options(self, hidden_dtype: torch.dtype, softcap: float | None, reduction: str = "mean") -> dict[str, Any]:
        """The keyword arguments of ``linear_cross_entropy`` that this config owns, for one call of the patched
        forward. Speed mode falls back to memory mode (one warning per reason) where the op would refuse it,
        so that a model configured for it keeps training instead of failing mid-run."""
        options: dict[str, Any] = dict(
            impl=self.impl, check_targets=self.check_targets, label_smoothing=self.label_smoothing, mode=self.mode,
        )
        if self.mode == "speed":
            problem = speed_mode_problem(hidden_dtype, reduction, False, softcap, self.label_smoothing)
            if problem is not None:
                _warn_once(f"CCEConfig(mode='speed') cannot be used here ({problem.reason}); using mode='memory'")
                options["mode"] = "memory"
            else:
                options["speed_chunk_bytes"] = self.speed_chunk_bytes
        elif self.mode == "auto":  # the op decides (ops/mode_choice.py), silently where speed mode cannot apply
            options["speed_chunk_bytes"] = self.speed_chunk_bytes
        if self.filter_eps is not None:
            problem = filter_problem(softcap, self.label_smoothing)
            if problem is not None:
                _warn_once(f"CCEConfig(filter_eps={self.filter_eps}) cannot be used here ({problem}); exact gradients")
            else:
                options.update(filter_eps=self.filter_eps, filter_counter=self.filter_counter,
                               filter_vocab_order=self.filter_vocab_order)
        return options


@functools.cache
def _warn_once(message: str) -> None:
    logger.warning(message)


def options_markdown() -> str:
    """The options table of the docs, generated from CCEConfig's fields and its docstring, so that the README
    (``cce-patch options`` prints it; tests/test_docs.py checks the README holds it) cannot drift from the
    class."""
    doc = CCEConfig.__doc__ or ""
    described: dict[str, str] = {}
    current = None
    for line in doc.split("Attributes:", 1)[-1].splitlines():
        text = line.strip()
        if not text:
            continue
        name, sep, rest = text.partition(": ")
        if sep and name in {f.name for f in fields(CCEConfig)} and line.startswith(" " * 8) and not line.startswith(" " * 12):
            current = name
            described[name] = rest
        elif current is not None:
            described[current] += " " + text
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for f in fields(CCEConfig):
        rows.append(f"| `{f.name}` | `{f.default!r}` | {described.get(f.name, '').replace('``', '`')} |")
    return "\n".join(rows)
