"""How speed mode splits a call into row chunks, what that holds in memory, and what torch.compile would hold.

Speed mode stores q (rows x V, the unnormalised probabilities) for one chunk of token rows at a time and turns
each chunk into its share of dE and dC with cuBLAS (``fused/speed_mode.py``). The chunking decides its memory:

- the q chunk itself, rows x V in the input dtype, plus ~3 fp32 rows x D temporaries of the chunk's GEMMs;
- beyond ``MAX_ROUNDED_DC_CHUNKS`` chunks of a half-precision call, dC is summed in an fp32 accumulator of
  V x D x 4 bytes (summing more partial products in place would round each; ``fused/speed_mode.py``);
- the gradients dE and dC it returns, and at the end an fp32 N x D buffer for the target rows (after q is freed).

The user compares that with a one-line ``torch.compile`` of the plain loss, which holds the logits in the input
dtype (N x V, saved for backward and overwritten by their gradient) plus dE and dC (``compile_bytes``: within 1%
of the peaks measured at the family heads, BENCHMARKS.md). So the default plan (``speed_chunk_bytes=None``) is
the fewest chunks whose working set is

1. at most ``STRICT_COMPILE_FRACTION`` (0.6) of torch.compile's, with chunks of at least ``MIN_FAST_ROWS`` rows
   (dC's GEMM has K = rows: below ~2k rows it runs below cuBLAS's rate). This is what CCE is for, and where the
   logits are large (from ~32k tokens) it costs no speed: the chunks stay large;
2. otherwise at most torch.compile's, chunks of any size;
3. otherwise none: ``within_compile`` is False, and ``mode="auto"`` takes memory mode (forced speed mode still
   runs, with the chunks of ``SPEED_CHUNK_BYTES``).

The fewest chunks also decides the fp32 accumulator: a plan with it is taken only where no plan of at most two
chunks fits, i.e. it is never paid to save a q chunk smaller than itself. q chunks stay within
``SPEED_CHUNK_BYTES`` (2 GiB) in every plan: larger GEMMs gain nothing.

Plans are cached per shape (``functools.lru_cache``): a training loop asks once per step, and the answer must
cost a dictionary lookup.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

#: Default byte budget for one chunk of q (rows x V, input dtype), and the cap of every default plan's chunk.
#: 2 GiB lets the paper shape (N=8192, V=256000, bf16) run in 2 chunks of 4096 rows: large GEMMs.
SPEED_CHUNK_BYTES = 2 * 1024**3
#: Up to this many row chunks dC is accumulated in place in the input dtype; beyond it in fp32 (V x D x 4
#: bytes). Measured at N=32768, 8 chunks, bf16: in place, dC's error was 1.9x memory mode's (KERNEL_NOTES, s2).
MAX_ROUNDED_DC_CHUNKS = 2
#: Where a plan within this fraction of torch.compile's memory exists with chunks of at least ``MIN_FAST_ROWS``
#: rows, the default takes it (the issue's goal from 32k tokens on: at most 0.6x torch.compile's memory).
STRICT_COMPILE_FRACTION = 0.6
#: Smallest chunk the strict plan may use: dC's GEMM has K = rows, and at K >= 2048 it runs at cuBLAS's rate.
MIN_FAST_ROWS = 2048


@dataclass(frozen=True)
class SpeedPlan:
    """Speed mode's chunking of one call and its memory, next to torch.compile's for the same call."""

    rows: int  # rows per chunk (the last chunk may be shorter)
    chunks: int
    fp32_dc: bool  # dC summed in an fp32 accumulator
    working_set: int  # bytes above the inputs at the peak, the returned gradients included
    compile_bytes: int  # what torch.compile of the plain loss holds for the same call
    within_compile: bool  # working_set <= compile_bytes (always True on the torch path: see plan_torch)


def speed_chunk_budget(speed_chunk_bytes: int | None) -> int:
    """The chunk budget of a call: the user's ``speed_chunk_bytes``, or the default."""
    return SPEED_CHUNK_BYTES if speed_chunk_bytes is None else int(speed_chunk_bytes)


def compile_bytes(n: int, d: int, v: int, dtype: torch.dtype) -> int:
    """Bytes above its inputs that ``torch.compile`` of ``F.cross_entropy(e @ c.T, t)`` holds at its peak: the
    logits in the input dtype (their gradient is written in their place) plus dE and dC. Measured: 3,070 MiB
    at N=8192 on Llama 3.1 8B's head, 5,162 MiB on Gemma 2's (H100, bf16); this formula gives 3,071 and 5,161."""
    itemsize = _itemsize(dtype)
    return (n * v + (n + v) * d) * itemsize


def triton_working_set(n: int, d: int, v: int, dtype: torch.dtype, rows: int) -> int:
    """Speed mode's peak on the Triton backend with chunks of ``rows`` rows (see the module doc)."""
    itemsize = _itemsize(dtype)
    chunks = math.ceil(n / rows)
    grads = (n * d + v * d) * itemsize
    fp32_dc = chunks > MAX_ROUNDED_DC_CHUNKS and dtype != torch.float32
    dc_acc = (v + 1) * d * 4 if fp32_dc else 0
    chunk = min(rows, n) * (math.ceil(v / 8) * 8) * itemsize + 3 * min(rows, n) * d * 4
    return grads + dc_acc + max(chunk, n * d * 4)


@functools.lru_cache(maxsize=4096)
def plan_triton(n: int, d: int, v: int, dtype: torch.dtype, chunk_bytes: int | None, block: int) -> SpeedPlan:
    """The Triton backend's plan for N x D hidden states and a V x D classifier (module doc), chunks rounded up
    to whole row blocks of ``block`` rows. With ``chunk_bytes`` the user's budget decides the chunk alone."""
    itemsize = _itemsize(dtype)
    row_bytes = math.ceil(v / 8) * 8 * itemsize
    tc = compile_bytes(n, d, v, dtype)

    def make(rows: int) -> SpeedPlan:
        chunks = max(1, math.ceil(n / rows))
        fp32_dc = chunks > MAX_ROUNDED_DC_CHUNKS and dtype != torch.float32
        ws = triton_working_set(n, d, v, dtype, rows)
        return SpeedPlan(rows, chunks, fp32_dc, ws, tc, ws <= tc)

    if chunk_bytes is not None:
        return make(_rows_for_budget(n, row_bytes, int(chunk_bytes), block))
    candidates = []
    # Fewer chunks than this hold a q chunk above SPEED_CHUNK_BYTES (skipped below anyway): start there, so that
    # a call of 2^30 rows (mode_choice bisects N that far) does not walk 2^25 chunk counts first.
    fewest = max(1, math.ceil(n * row_bytes / SPEED_CHUNK_BYTES))
    floor = n * d * 4  # the working set's chunk term never goes below the final fp32 N x D buffer
    for chunks in range(fewest, max(1, math.ceil(n / block)) + 1):
        rows = max(block, _round_up(math.ceil(n / chunks), block))
        if candidates and rows == candidates[-1].rows:
            continue
        if rows * row_bytes > SPEED_CHUNK_BYTES:
            continue
        candidates.append(make(rows))
        held = min(rows, n)
        if candidates[-1].rows <= block or held * row_bytes + 3 * held * d * 4 <= floor:
            break  # smaller chunks hold no less (the floor), and have fewer rows: never a better plan
    for plan in candidates:
        if plan.rows >= min(MIN_FAST_ROWS, n) and plan.working_set <= STRICT_COMPILE_FRACTION * tc:
            return plan
    for plan in candidates:
        if plan.within_compile:
            return plan
    return make(_rows_for_budget(n, row_bytes, SPEED_CHUNK_BYTES, block))  # forced speed mode runs this


def plan_torch(n: int, d: int, v: int, dtype: torch.dtype, chunk_bytes: int | None, rows: int) -> SpeedPlan:
    """The chunked torch path's plan for chunks of ``rows`` rows (its own byte rule, ``chunked_torch.py``).

    Its working set: ~4 fp32 rows x V chunk temporaries (logits, probabilities, their gradient), an fp32 copy of
    C and an fp32 dC. It is not held to torch.compile's memory: on a CPU (its main use) speed mode was as fast
    or faster at every shape tried and memory is rarely the limit, and on CUDA it runs only IEEE fp32 calls,
    whose comparison is with an fp32 torch.compile holding fp32 logits."""
    itemsize = _itemsize(dtype)
    held = max(1, min(n, rows))  # rows is kept as the path gave it: a filtering call rounds it to whole blocks
    grads = (n * d + v * d) * itemsize
    c32 = v * d * 4 if dtype != torch.float32 else 0
    ws = grads + c32 + v * d * 4 + 4 * held * v * 4 + held * d * 4
    return SpeedPlan(rows, max(1, math.ceil(n / held)), dtype != torch.float32, ws, compile_bytes(n, d, v, dtype),
                     True)


def _rows_for_budget(n: int, row_bytes: int, chunk_bytes: int, block: int) -> int:
    """Rows per chunk so that q fits ``chunk_bytes``: chunks balanced, whole row blocks, at least one block."""
    cap = max(block, chunk_bytes // row_bytes)
    chunks = max(1, math.ceil(n / cap))
    return max(block, _round_up(math.ceil(n / chunks), block))


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize
