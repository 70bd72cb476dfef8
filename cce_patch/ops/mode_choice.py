"""``mode="auto"`` (the default): which of the two exact modes a call runs, decided once per shape.

Both modes give the same loss and gradients; they differ in time and memory (``speed_mode.py``):

- speed mode skips the backward's recompute of the logits (3 GEMMs of N x D x V instead of 4: at the paper
  shape on an H200 44-48 ms instead of 58-61 ms), but holds one chunk of unnormalised probabilities plus fp32
  row temporaries during the forward (the chunks are planned in ``speed_plan.py``);
- memory mode stays within ~1.2x the gradients' memory.

So auto takes speed mode when (1) it can compute the call at all (``options.speed_mode_problem``: fp16,
``reduction="none"``, ``return_lse``, softcap with label smoothing take memory mode, silently: the user did not
ask for speed), (2) the GEMM it saves is worth more than its extra per-call host work and its per-logit work
(``SPEED_MIN_WORK`` and ``SPEED_MIN_HIDDEN``, for the Triton backend: the chunked torch path has no such fixed
cost, and on a CPU its speed mode was as fast or faster at every shape tried, 3.5x at N=1024, D=896, V=151936,
where memory mode's 64 MiB chunks make many small products and as many passes over the fp32 dC), (3) on the
Triton backend, its planned working set is at most what ``torch.compile`` of the plain loss would hold for the
same call (``speed_plan.SpeedPlan.within_compile``: a user who compares the default with a one-line
torch.compile must never find it holding more), and (4) its working set (``speed_working_set_bytes``) is at most
``AUTO_MEMORY_FRACTION`` of the memory free when the shape is first seen (``free_memory_bytes``). The answer is
cached per shape (device, backend, N, D, V, dtype, chunk budget): reading free memory is a driver call, and one
shape should not flip between modes from step to step; a decided call signature costs one dict lookup. If
speed mode still runs out of memory (free memory shrinks after the first step: optimizer states are allocated at
the first ``optimizer.step()``), the op reruns that call in memory mode and the shape stays there
(``note_speed_oom``).

Each choice is logged once (logger ``cce_patch``, INFO) per head shape, dtype, device and outcome; every further
token count that reaches the same outcome is logged at DEBUG only, so a padded-to-longest dataset, whose N
changes every step, does not fill the log.
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .backends import get_backend
from .options import speed_mode_problem

logger = logging.getLogger("cce_patch")

#: Below this many multiply-adds per call (N * D * V) auto takes memory mode on the Triton backend. Why: speed mode saves
#: one GEMM (2 N D V flops, 0.88 ms at 3e11 on an H200's ~685 TFLOP/s) but issues ~20 more small launches and
#: one more host sync per call (its row preparation, the range check). Measured on an H200 at D=2304,
#: V=256000: at N=1024 (6e11) speed mode is already 18% faster (6.3 vs 7.7 ms), i.e. its fixed extra cost is
#: below ~0.4 ms; the threshold sits at twice that break-even. ``tests/gpu/auto_mode.py`` measures both modes
#: from N=512 up, per head, and prints the smallest work at which speed mode won every larger point: set this
#: constant from that line.
SPEED_MIN_WORK = 1e11
#: Below this hidden size auto takes memory mode on the Triton backend. Why: speed mode saves one GEMM, worth
#: 2 N D V flops, but pays per logit (it stores q = exp(z - anchor) and cuBLAS reads it twice), so its gain
#: shrinks with D. Measured on an H200 (tests/gpu/auto_mode.py, 2026-12-01): at D=896 (Qwen2.5-0.5B's head,
#: the Trainer's shifted and prompt-masked 16 x 128..512 tokens) speed mode took 1.7-1.9x memory mode's time
#: (16 x 512: 27.2 vs 15.3 ms); at D >= 2304 (Gemma 2, Qwen2.5-7B, Phi 3.5, Mistral NeMo, Llama 3.1) it won at
#: every measured N (Gemma 2's head: from N=256). A line through the two per-logit differences crosses zero near
#: D ~ 1750; 2048 keeps Llama-3.2-1B's head (D=2048) on the faster side of that estimate.
SPEED_MIN_HIDDEN = 2048
#: Speed mode is taken only if its working set is at most this fraction of the free memory: the rest of the
#: step (the backward of the layers, fragmentation, optimizer states appearing after the first step) needs
#: room too, and running out of memory must never be the price of the faster default.
AUTO_MEMORY_FRACTION = 0.5
#: Decisions kept (one per distinct shape); a padded-to-longest dataset brings a new N every few steps.
MAX_CACHED_CHOICES = 4096


@dataclass(frozen=True)
class ModeChoice:
    """The mode auto takes for one shape, and why (for the log and the tests)."""

    mode: str
    reason: str
    outcome: str  # "speed", "small", "over-compile", "memory-pressure", "no-free-memory-info", "oom": the log's key


_choices: OrderedDict[tuple, ModeChoice] = OrderedDict()
_logged: set[tuple] = set()
#: The answer per call signature (shape, dtype, device, backend and the options the rule reads), filled after the
#: first call of each: later calls of a decided shape cost one tuple and one dict lookup (no device query, no
#: rule). Emptied by ``clear_choices`` and ``note_speed_oom``.
_decided: dict[tuple, str] = {}


def clear_choices() -> None:
    """Forget every cached decision and what was logged (tests; or after freeing a lot of memory)."""
    _choices.clear()
    _logged.clear()
    _decided.clear()


def free_memory_bytes(device: torch.device) -> int | None:
    """Bytes a new allocation on ``device`` can use now, or None when unknown.

    CUDA: what the driver reports free plus what PyTorch's caching allocator holds but does not use (it hands
    that out first). CPU: the kernel's estimate of available memory (``MemAvailable``: free plus reclaimable
    caches)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        try:
            import psutil

            return int(psutil.virtual_memory().available)
        except ImportError:
            pass
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    return None


def speed_working_set_bytes(n: int, d: int, v: int, dtype: torch.dtype, backend, chunk_bytes: int | None) -> int:
    """Bytes speed mode allocates during its forward, above the inputs, for N x D hidden states and a V x D
    classifier: the gradients it returns (dE, dC) and, at its peak, one chunk's working set (``speed_plan.py``
    says what each backend holds; ``chunk_bytes`` None is the default plan)."""
    return backend.speed_plan(n, d, v, dtype, chunk_bytes).working_set


def choose_mode(
    e2d: torch.Tensor,
    c: torch.Tensor,
    backend: str,
    *,
    wants_grad: bool,
    reduction: str,
    return_lse: bool,
    softcap: float | None,
    label_smoothing: float,
    speed_chunk_bytes: int | None,
) -> str:
    """``"speed"`` or ``"memory"`` for a call of ``mode="auto"`` on ``backend`` (see the module doc). Without
    gradients, or without rows, both modes are the plain forward: nothing is decided or logged.

    Under ``torch.compile`` the rule is read once per head when the call is traced, as the range of N in which
    speed mode applies (``_speed_rows``, which Dynamo treats as a constant: reading free memory is not
    traceable), and N is compared with it in the graph, so a symbolic N (dynamic shapes) gets a shape guard,
    not a graph break."""
    n = e2d.shape[0]
    if not wants_grad:
        return "memory"
    options = (reduction, return_lse, softcap, label_smoothing, speed_chunk_bytes)
    if torch.compiler.is_compiling():
        lo, hi = _speed_rows(e2d.device.type, e2d.device.index, backend, e2d.shape[1], c.shape[0], e2d.dtype, *options)
        return "speed" if lo <= n <= hi else "memory"
    signature = (e2d.device, backend, n, e2d.shape[1], c.shape[0], e2d.dtype, *options)
    mode = _decided.get(signature)
    if mode is not None:
        return mode
    if n == 0:
        return "memory"
    mode = _choose(e2d.device.type, e2d.device.index, backend, n, e2d.shape[1], c.shape[0], e2d.dtype, *options)
    if len(_decided) >= MAX_CACHED_CHOICES:
        _decided.clear()
    _decided[signature] = mode
    return mode


def note_speed_oom(e2d: torch.Tensor, c: torch.Tensor, backend: str, speed_chunk_bytes: int | None) -> None:
    """Speed mode ran out of memory on this shape under auto: memory mode for it from now on (logged once)."""
    key = _key(e2d.device, backend, e2d.shape[0], e2d.shape[1], c.shape[0], e2d.dtype, speed_chunk_bytes)
    choice = ModeChoice("memory", "speed mode ran out of memory; this call and later ones of this shape use "
                        "memory mode", "oom")
    _decided.clear()  # rare: the next call of every shape reads _choices again
    _remember(key, choice)
    _log(choice, key)


def _choose(device_type: str, device_index: int | None, backend: str, n: int, d: int, v: int, dtype: torch.dtype,
            reduction: str, return_lse: bool, softcap: float | None, label_smoothing: float,
            speed_chunk_bytes: int | None) -> str:
    device = torch.device(device_type, device_index)
    key = _key(device, backend, n, d, v, dtype, speed_chunk_bytes)
    problem = speed_mode_problem(dtype, reduction, return_lse, softcap, label_smoothing)
    if problem is not None:  # not cached: it depends on options, not on the shape, and costs nothing
        choice = ModeChoice("memory", f"speed mode cannot compute this call: {problem.message}", "unsupported")
        _log(choice, key, detail=True)
        return choice.mode
    choice = _choices.get(key)
    if choice is None:
        choice = _decide(n, d, v, dtype, device, get_backend(backend), speed_chunk_bytes)
        _remember(key, choice)
        _log(choice, key)
    else:
        _choices.move_to_end(key)
    return choice.mode


def _speed_rows(device_type: str, device_index: int | None, backend: str, d: int, v: int, dtype: torch.dtype,
                reduction: str, return_lse: bool, softcap: float | None, label_smoothing: float,
                speed_chunk_bytes: int | None) -> tuple[int, int]:
    """(lo, hi): the rule as a range, speed mode for lo <= N <= hi (empty where it cannot apply): lo from
    ``SPEED_MIN_WORK``, hi the largest N whose working set is within ``AUTO_MEMORY_FRACTION`` of the free
    memory now (bisection; the estimate grows with N but for small steps at chunk boundaries)."""
    device = torch.device(device_type, device_index)
    key = _key(device, backend, 0, d, v, dtype, speed_chunk_bytes)
    problem = speed_mode_problem(dtype, reduction, return_lse, softcap, label_smoothing)
    free = free_memory_bytes(device) if problem is None else None
    if free is None:
        reason = f"speed mode cannot compute this call: {problem.message}" if problem else f"free memory on {device} is unknown"
        _log(ModeChoice("memory", reason + " (torch.compile: every N)", "compiled"), key, detail=True)
        return 1, 0
    lo = math.ceil(SPEED_MIN_WORK / (d * v)) if backend == "triton" else 1
    if backend == "triton" and d < SPEED_MIN_HIDDEN:
        lo = 2**31  # an empty range: memory mode at every N
    handle, limit = get_backend(backend), AUTO_MEMORY_FRACTION * free
    hi, top = 0, 2**31
    while hi < top:
        mid = (hi + top + 1) // 2
        plan = handle.speed_plan(mid, d, v, dtype, speed_chunk_bytes)
        if plan.within_compile and plan.working_set <= limit:
            hi = mid
        else:
            top = mid - 1
    _log(ModeChoice("speed" if lo <= hi else "memory", f"torch.compile: speed mode for {lo} <= N <= {hi}, memory "
                    f"mode otherwise ({free / 1e9:.2f} GB free)", "compiled"), key, detail=True)
    return lo, hi


# Under torch.compile, Dynamo calls _speed_rows while tracing and treats its answer as a constant, exactly as
# torch.compiler.assume_constant_result(_speed_rows) would mark it; set directly because that function imports
# Dynamo (~2 s), which eager users never need (tests/test_mode_choice.py checks the two agree).
_speed_rows._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _decide(n: int, d: int, v: int, dtype: torch.dtype, device: torch.device, backend,
            chunk_bytes: int | None) -> ModeChoice:
    work = n * d * v
    if backend.name == "triton" and d < SPEED_MIN_HIDDEN:
        return ModeChoice("memory", f"D = {d} < SPEED_MIN_HIDDEN = {SPEED_MIN_HIDDEN}: at small hidden sizes speed "
                          "mode's per-logit work costs more than the GEMM it saves", "small")
    if backend.name == "triton" and work < SPEED_MIN_WORK:
        return ModeChoice("memory", f"N*D*V = {work:.2g} < SPEED_MIN_WORK = {SPEED_MIN_WORK:.2g}: the GEMM speed "
                          "mode saves costs less than its extra launches", "small")
    plan = backend.speed_plan(n, d, v, dtype, chunk_bytes)
    need = plan.working_set
    if not plan.within_compile:
        return ModeChoice("memory", f"speed mode would hold {need / 1e9:.2f} GB, more than the "
                          f"{plan.compile_bytes / 1e9:.2f} GB torch.compile of the plain loss holds", "over-compile")
    free = free_memory_bytes(device)
    if free is None:
        return ModeChoice("memory", f"free memory on {device} is unknown", "no-free-memory-info")
    if need > AUTO_MEMORY_FRACTION * free:
        return ModeChoice("memory", f"speed mode's working set {need / 1e9:.2f} GB is more than "
                          f"{AUTO_MEMORY_FRACTION:g} x the {free / 1e9:.2f} GB free", "memory-pressure")
    return ModeChoice("speed", f"working set {need / 1e9:.2f} GB of {free / 1e9:.2f} GB free", "speed")


def _key(device: torch.device, backend: str, n: int, d: int, v: int, dtype: torch.dtype,
         speed_chunk_bytes: int | None) -> tuple:
    # None (the planned chunks) and an explicit budget are different plans, even where the budget is the default
    # 2 GiB cap: they may hold different memory and so get different answers
    return (str(device), backend, n, d, v, dtype, speed_chunk_bytes)


def _remember(key: tuple, choice: ModeChoice) -> None:
    _choices[key] = choice
    _choices.move_to_end(key)
    while len(_choices) > MAX_CACHED_CHOICES:
        _choices.popitem(last=False)


def _log(choice: ModeChoice, key: tuple, detail: bool = False) -> None:
    device, _, n, d, v, dtype, _ = key
    head = (device, d, v, dtype, choice.outcome, choice.reason if detail else "")
    message = "linear_cross_entropy(mode='auto'): %s mode for N=%d, D=%d, V=%d, %s on %s (%s)"
    args = (choice.mode, n, d, v, str(dtype).removeprefix("torch."), device, choice.reason)
    if head in _logged:
        logger.debug(message, *args)
    else:
        _logged.add(head)
        logger.info(message + "; logged once per head shape and outcome", *args)
