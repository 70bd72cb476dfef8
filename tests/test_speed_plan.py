"""Speed mode's row chunks (``ops/speed_plan.py``): the default plan's memory against torch.compile's at every
family head, the fp32 accumulator only where no two-chunk plan fits, and the estimates against measured peaks."""

from __future__ import annotations

import math

import pytest
import torch

from cce_patch.ops.speed_plan import (
    MAX_ROUNDED_DC_CHUNKS,
    SPEED_CHUNK_BYTES,
    STRICT_COMPILE_FRACTION,
    compile_bytes,
    plan_triton,
    triton_working_set,
)

#: (D, V) of the heads issue 21 names: Gemma 2 2B, Qwen 2.5 7B, Phi 3.5 mini, Mistral NeMo, Llama 3.1 8B,
#: Gemma 3, Qwen 3.
HEADS = [(2304, 256000), (3584, 152064), (3072, 32064), (5120, 131072), (4096, 128256), (2560, 262144),
         (4096, 151936)]
BLOCK = 128  # the storing kernel's row block on the GPU (fused/tiles.py)
MIB = 2**20


def test_compile_bytes_matches_the_measured_peaks():
    """torch.compile of the plain loss, N=8192, bf16, H100 (issue 21's table): 3,070 MiB on Llama 3.1 8B's
    head, 5,162 on Gemma 2's, 3,472 on Qwen 2.5 7B's, 738 on Phi 3.5's."""
    for (d, v), measured in [((4096, 128256), 3070), ((2304, 256000), 5162), ((3584, 152064), 3472),
                             ((3072, 32064), 738)]:
        assert abs(compile_bytes(8192, d, v, torch.bfloat16) / MIB - measured) < 0.01 * measured


def test_working_set_matches_the_measured_peaks_of_one_chunk():
    """Speed mode's peaks measured before the plan (one chunk at 8k on Llama 3.1 8B's head: 3,458 MiB; Phi 3.5's:
    1,030 MiB), from the same estimate the plan uses."""
    assert abs(triton_working_set(8192, 4096, 128256, torch.bfloat16, 8192) / MIB - 3458) < 0.02 * 3458
    assert abs(triton_working_set(8192, 3072, 32064, torch.bfloat16, 8192) / MIB - 1030) < 0.02 * 1030


@pytest.mark.parametrize("d,v", HEADS)
@pytest.mark.parametrize("n", [2048, 8192, 32768, 65536])
def test_the_default_plan_holds_less_than_torch_compile(n, d, v):
    """At every head and N the default plan is within torch.compile's memory, and from 32k tokens on within
    STRICT_COMPILE_FRACTION of it; no chunk is above the 2 GiB cap."""
    plan = plan_triton(n, d, v, torch.bfloat16, None, BLOCK)
    assert plan.within_compile and plan.working_set <= plan.compile_bytes
    if n >= 32768:
        assert plan.working_set <= STRICT_COMPILE_FRACTION * plan.compile_bytes
    assert plan.rows * v * 2 <= SPEED_CHUNK_BYTES and plan.rows % BLOCK == 0
    assert plan.chunks == -(-n // plan.rows)


@pytest.mark.parametrize("d,v", HEADS)
@pytest.mark.parametrize("n", [2048, 8192, 32768, 65536])
def test_the_fp32_accumulator_is_paid_only_for_a_smaller_working_set(n, d, v):
    """A plan with the fp32 dC accumulator (V x D x 4 bytes) holds less than every plan of at most two chunks
    (under the chunk cap): the q it saves is larger than the accumulator it costs."""
    plan = plan_triton(n, d, v, torch.bfloat16, None, BLOCK)
    two_chunk_sets = []
    for chunks in range(1, MAX_ROUNDED_DC_CHUNKS + 1):
        rows = max(BLOCK, math.ceil(math.ceil(n / chunks) / BLOCK) * BLOCK)
        if rows * v * 2 <= SPEED_CHUNK_BYTES:
            two_chunk_sets.append(triton_working_set(n, d, v, torch.bfloat16, rows))
    assert plan.fp32_dc == (plan.chunks > MAX_ROUNDED_DC_CHUNKS)
    if plan.fp32_dc:
        assert all(ws > plan.working_set for ws in two_chunk_sets)


def test_llama_at_8k_splits_in_two_instead_of_holding_more_than_torch_compile():
    """The issue's case: at N=8192 on Llama 3.1 8B's head one chunk (the old 2 GiB rule) held 3,458 MiB against
    torch.compile's 3,070; the plan takes two chunks of 4096 rows, in place, below it."""
    one = triton_working_set(8192, 4096, 128256, torch.bfloat16, 8192)
    assert one > compile_bytes(8192, 4096, 128256, torch.bfloat16)
    plan = plan_triton(8192, 4096, 128256, torch.bfloat16, None, BLOCK)
    assert (plan.rows, plan.chunks, plan.fp32_dc) == (4096, 2, False)
    assert plan.working_set < 0.8 * plan.compile_bytes


def test_a_user_budget_decides_the_chunk_alone():
    """speed_chunk_bytes keeps its meaning: q fits it (balanced chunks of whole blocks)."""
    for budget, rows in [(2 * 1024**3, 4096), (2**29, 1024), (2**26, 256)]:  # 131 rows -> 63 chunks of 256
        assert plan_triton(8192, 2304, 256000, torch.bfloat16, budget, BLOCK).rows == rows


def test_no_plan_within_torch_compile_is_reported_not_hidden():
    """D > V: the fp32 N x D target-row buffer alone is more than the logits; the plan says so (auto then takes
    memory mode) and still gives forced speed mode a chunking."""
    plan = plan_triton(4096, 4096, 1000, torch.bfloat16, None, BLOCK)
    assert not plan.within_compile and plan.rows >= BLOCK
