"""The backends of the op, each one record of the same shape, and the one place that chooses between them.

A backend computes the loss of flattened rows (``spec.py`` has the math) four ways, and the per-token statistics
of ``linear_log_probs`` (``stats.py``) a fifth:

- ``forward(e2d, c, bias, targets_flat, spec) -> (loss_rows, lse_rows)``, fp32 (N,), 0 on ignored rows;
- ``backward(e2d, c, bias, targets_flat, spec, lse, grad_loss, grad_lse, needs) -> (dE, dC, dbias)``, the
  memory mode's recompute, for per-row upstream gradients (``needs`` says which gradients to form);
- ``forward_with_grads(e2d, c, bias, targets_flat, spec, mean, needs, chunk_rows) -> (loss_rows, lse_rows,
  dE, dC, dbias, in_range, weight)``, speed mode: the gradients of ``weight * sum of counted rows`` formed in
  the forward pass; ``in_range`` is None or a 0-dim bool tensor, False when the result must not be used;
- ``speed_plan(n, d, vocab, dtype, chunk_bytes) -> SpeedPlan``, speed mode's row chunks and their memory
  (``speed_plan.py``; ``chunk_bytes`` None for the default plan);
- ``stats_forward(e2d, c, bias, targets_flat, spec, stats) -> (log_probs, lse, entropy, log_sum_sq_probs,
  mean_logits, is_top1)``, per row, the fields ``stats`` does not ask for None. Their gradients are
  ``backward``'s, with two keyword arguments the loss path never passes: ``grad_plogp`` (the entropy's
  per-row coefficient) and ``logit_scale`` (the statistics' factor alpha on the products).

``"torch"`` is the chunked PyTorch path (``chunked_torch.py``), ``"triton"`` the fused kernels (``fused/``),
imported only when chosen: importing Triton is slow, and absent on some platforms.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .options import speed_mode_problem
from .precision import is_ieee_fp32
from .speed_plan import SpeedPlan, plan_torch, speed_chunk_budget


@dataclass(frozen=True)
class Backend:
    name: str
    forward: Callable
    backward: Callable
    forward_with_grads: Callable
    speed_plan: Callable[[int, int, int, torch.dtype, int | None], SpeedPlan]
    stats_forward: Callable
    #: Its ``forward_with_grads`` reads no class row through a target outside [0, V) (such a row counts as
    #: ignored), so the op may check the targets at that path's one host sync instead of before it
    #: (``validation.scored_targets_ok``): a bad target still raises before the caller sees any result.
    speed_checks_targets_late: bool = False
    #: ``(e2d, c, grad_filter, speed_chunk_bytes, mode) -> bool``: whether a filtered call of this shape and mode
    #: ("speed" or "memory") can run as the exact call (its last deciding call found nothing worth skipping; it
    #: counts the call's pairs as seen, none skipped), asked once per call before the vocabulary is ordered.
    #: None: always filter.
    filter_bypass: Callable | None = None
    #: ``(e2d, c, bias, targets_flat, spec) -> (loss_rows, lse_rows, tile_stats)``: memory mode's forward for a
    #: filtered call, leaving what the backward's filter decides from (``backward(..., grad_filter=,
    #: tile_stats=)``). None: the backward filters from its own recompute (the torch path).
    filter_forward: Callable | None = None


@functools.cache
def get_backend(name: str) -> Backend:
    """The backend called ``name`` (``"torch"`` or ``"triton"``), as resolved by :func:`resolve_impl`."""
    if name == "torch":
        from . import chunked_torch as path

        def torch_plan(n: int, d: int, v: int, dtype: torch.dtype, chunk_bytes: int | None) -> SpeedPlan:
            rows = path.speed_chunk_rows(n, v, dtype, speed_chunk_budget(chunk_bytes))
            return plan_torch(n, d, v, dtype, chunk_bytes, rows)

        return Backend("torch", path.forward, path.backward, path.forward_with_grads, torch_plan, path.stats_forward)
    if name == "triton":
        from .fused import memory_filter, memory_mode, speed_mode

        def filter_bypass(e2d, c, grad_filter, speed_chunk_bytes, mode: str) -> bool:
            if mode == "speed":
                return speed_mode.filter_bypass(e2d, c, grad_filter, speed_chunk_bytes)
            return memory_filter.filter_bypass(e2d, c, grad_filter)

        return Backend("triton", memory_mode.forward, memory_filter.backward, speed_mode.forward_with_grads,
                       speed_mode.speed_plan, memory_mode.stats_forward, speed_checks_targets_late=True,
                       filter_bypass=filter_bypass, filter_forward=memory_filter.forward)
    raise ValueError(f"unknown backend {name!r}; expected 'torch' or 'triton'")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


#: The backends whose gradients honour ``filter_eps`` (``filtering.py``): the torch path in both modes, the Triton
#: kernels in speed mode (``fused/speed_mode.py``, from the masses of the q it stores) and in memory mode
#: (``fused/memory_filter.py``, from the masses its forward leaves: ``Backend.filter_forward``) but not for fp16
#: inputs; see :func:`_filtering_impl`.
FILTERING_BACKENDS = ("torch", "triton")
#: The backends whose memory-mode ``backward`` filters from its own recompute, with no statistics of the forward
#: (so speed mode's recomputing fallback can filter too).
MEMORY_FILTERING_BACKENDS = ("torch",)


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype | None = None, *, filtered: bool = False,
                 mode: str = "auto", reduction: str = "mean", return_lse: bool = False) -> str:
    """``filtered`` (the call has ``filter_eps``; ``mode``, ``reduction`` and ``return_lse`` are the call's, read
    only then): see :func:`_filtering_impl`. Otherwise ``auto`` picks Triton on
    CUDA devices (when Triton is installed) and the torch path elsewhere, except for IEEE fp32 (fp32 inputs,
    TF32 not opted in: ``precision.py``) on CUDA, which takes the torch path.

    Why: Hopper's tensor cores have no IEEE fp32 mode, so Triton lowers an IEEE fp32 ``tl.dot`` to CUDA-core
    FMAs far below cuBLAS's SGEMM. Measured on an H200 at N=8192, D=2304, V=256000: our fused forward took
    12.5 s where one cuBLAS SGEMM of the same size takes 181 ms (KERNEL_NOTES.md, v7). The torch path gets its
    logits from cuBLAS SGEMMs, in row chunks large enough for them (``chunked_torch.CUDA_CHUNK_BYTES``)."""
    if filtered:
        return _filtering_impl(impl, device, dtype, mode, reduction, return_lse)
    ieee_on_cuda = device.type == "cuda" and dtype is not None and is_ieee_fp32(dtype)
    if impl == "auto":
        return "triton" if device.type == "cuda" and _triton_available() and not ieee_on_cuda else "torch"
    if impl == "triton":
        if not _triton_available():
            raise RuntimeError("impl='triton' needs the `triton` package; install it or use impl='torch'")
        if device.type != "cuda" and not _interpreting():
            raise ValueError(
                f"impl='triton' needs CUDA tensors (got {device}); use impl='torch' or 'auto' on CPU "
                "(or set TRITON_INTERPRET=1 before importing triton, for testing)"
            )
        if ieee_on_cuda:
            warnings.warn(
                "impl='triton' with fp32 inputs and TF32 off runs the fused kernels' IEEE fp32 products on CUDA "
                "cores, ~70x slower than cuBLAS SGEMM (H200: 12.5 s vs 181 ms at N=8192, V=256000); impl='auto' "
                "takes the cuBLAS path, and torch.backends.cuda.matmul.allow_tf32 = True opts into TF32",
                stacklevel=3,
            )
    return impl


def _filtering_impl(impl: str, device: torch.device, dtype: torch.dtype | None, mode: str, reduction: str,
                    return_lse: bool) -> str:
    """The backend of a call with ``filter_eps``: one that filters this call, never one that would silently
    compute exact gradients instead. The torch path filters in both modes; the Triton backend in both modes for
    bf16 and fp32 inputs (``mode="speed"`` only where speed mode can run the call; ``"auto"`` takes speed mode
    where it can, memory mode otherwise: ``filtered_mode``). Where it cannot (fp16, or ``mode="speed"`` with
    ``reduction="none"`` or ``return_lse``) ``impl="auto"`` takes the torch path (warning on CUDA: slower than
    the fused kernels) and ``impl="triton"`` is refused, before any launch."""
    choice = resolve_impl(impl, device, dtype)
    if choice in MEMORY_FILTERING_BACKENDS:
        return choice
    problem = _triton_filter_problem(dtype, mode, reduction, return_lse)
    if problem is None:
        return choice
    if impl == "auto":
        warnings.warn(
            f"filter_eps: the triton backend cannot filter this call ({problem}); impl='auto' takes the torch "
            "path for this call (slower on a GPU than the fused kernels)",
            stacklevel=4,
        )
        return "torch"
    raise ValueError(
        f"filter_eps with impl='triton' cannot filter this call ({problem}); use bf16 or fp32 inputs, mode='memory' "
        "or 'auto' for reduction='none' or return_lse, impl='torch' (which filters everything it computes), or "
        "filter_eps=None"
    )


def _triton_filter_problem(dtype: torch.dtype | None, mode: str, reduction: str, return_lse: bool) -> str | None:
    """Why the Triton backend cannot filter this call, or None: fp16 inputs (memory mode's fp16 dS scaling is its
    exact path's only, and speed mode refuses fp16), or, with ``mode="speed"``, whatever keeps speed mode from
    the call (``options.speed_mode_problem``; softcap with label smoothing never gets here: the filter refuses
    it first)."""
    if dtype == torch.float16:
        return "fp16 inputs"
    if mode != "speed":
        return None
    problem = speed_mode_problem(dtype, reduction, return_lse, None, 0.0) if dtype is not None else None
    return problem.reason if problem is not None else None


def filtered_mode(mode: str, backend: str, filtered: bool, dtype: torch.dtype | None = None,
                  reduction: str = "mean", return_lse: bool = False) -> str:
    """The mode of a call: ``mode="auto"`` with ``filter_eps`` on the Triton backend is speed mode where speed
    mode can run the call (its filter is decided per row chunk, with no host sync in the steady state), memory
    mode otherwise (``reduction="none"``, ``return_lse``); other calls keep their mode."""
    if not (filtered and backend == "triton" and mode == "auto"):
        return mode
    blocked = dtype is not None and speed_mode_problem(dtype, reduction, return_lse, None, 0.0) is not None
    return "memory" if blocked else "speed"
