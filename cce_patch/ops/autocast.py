"""The op under autocast: inputs in the dtype autocast would give ``F.linear``, accumulation always fp32.

The rule (the same on every device that has autocast, and for the compiled path):

- Outside autocast, ``e`` and ``c`` must share a dtype, as ``F.linear`` requires; nothing is cast.
- Inside ``torch.autocast(device_type=e.device.type, dtype=X)``, the op takes the place of
  ``F.linear(e, c, bias)`` followed by an fp32 cross-entropy, which is what a stock model computes there
  (transformers' ``ForCausalLMLoss`` upcasts the logits). ``F.linear`` is on autocast's lower-precision list,
  so ``e``, ``c`` and ``bias`` are cast to ``X`` exactly as autocast would cast them (floating tensors other
  than fp64); a model whose hidden states are bf16 and whose ``lm_head.weight`` is fp32, or both fp32,
  therefore works as it does stock. The casts are ordinary differentiable ops, so the gradients reach the
  original tensors in their own dtypes, as stock's do.
- The op itself then runs with autocast switched off (``autocast_off``): its products accumulate in fp32 and
  its log-sum-exp, softmax and reductions are fp32, whatever autocast would have done to a matmul or a
  ``logsumexp`` in its body (on the CPU, bf16 autocast ran both in bf16 before this rule: loss error 1.7e-4
  against the fp64 loss of the same inputs, where stock's is ~1e-5 and ours is now ~1e-7). The logits are
  never rounded to ``X`` (stock rounds them once, in ``F.linear``'s output), so the loss is at least as
  accurate as stock's.
"""

from __future__ import annotations

import contextlib

import torch

#: One C call that answers "is autocast on anywhere?" (0.16 us, where asking per device type costs ~1 us):
#: the common no-autocast call pays only this. Dynamo traces it.
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)
_NO_CONTEXT = contextlib.nullcontext()


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts lower-precision ops to on ``device_type``, or None where it is off.

    While torch.compile traces, only ``torch.is_autocast_enabled`` / ``get_autocast_dtype`` are asked: on the
    GPU image's torch 2.11, Dynamo graph-broke twice on a compiled training step under CUDA autocast at a
    ``torch._C`` builtin it does not trace (the two availability shortcuts below; torch 2.13 traces them)."""
    if torch.compiler.is_compiling():
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    if not _any_autocast():
        return None
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _cast(x: object, dtype: torch.dtype) -> object:
    """``x`` in ``dtype`` where autocast would cast it (a floating tensor, not fp64); anything else as is
    (validation reports what is wrong with it)."""
    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype not in (torch.float64, dtype):
        return x.to(dtype)
    return x


def autocast_inputs(e: object, c: object, bias: object) -> tuple[object, object, object]:
    """``(e, c, bias)`` as the op computes with them: cast to the autocast dtype of ``e``'s device when
    autocast is on there, unchanged otherwise."""
    if not isinstance(e, torch.Tensor) or (not torch.compiler.is_compiling() and not _any_autocast()):
        return e, c, bias
    dtype = _autocast_dtype(e.device.type)
    if dtype is None:
        return e, c, bias
    return _cast(e, dtype), _cast(c, dtype), _cast(bias, dtype)


def compute_dtype(e: torch.Tensor, c: torch.Tensor) -> torch.dtype:
    """The dtype ``linear_cross_entropy(e, c, ...)`` computes in when called here and now: the autocast
    dtype under autocast, else ``e``'s. Callers that choose options by dtype (speed mode refuses fp16) ask
    this rather than ``e.dtype``."""
    cast_e, _, _ = autocast_inputs(e, c, None)
    return cast_e.dtype  # type: ignore[union-attr]


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """A context in which autocast leaves the op's own arithmetic alone on ``device`` (a no-op context when
    autocast is off there, the common case, so eager calls pay nothing for it)."""
    if _autocast_dtype(device.type) is None:
        return _NO_CONTEXT
    return torch.autocast(device.type, enabled=False)
