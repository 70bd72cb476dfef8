"""mode="speed": gradients formed in the forward pass, on both backends, against the fp64 oracle.

The Triton path runs under TRITON_INTERPRET=1 on CPU (natively on GPU). Small byte budgets force several
row chunks (the last one ragged), so the in-place dC accumulation across chunks is exercised.
"""

from __future__ import annotations

import itertools
from functools import partial

import pytest
import torch
from conftest import HAS_CUDA, INTERPRETING
from oracle import TOL, check_against_oracle, dense_reference, make_inputs, rel_err

from cce_patch import linear_cross_entropy

DEVICE = "cuda" if HAS_CUDA and not INTERPRETING else "cpu"
IMPLS = ["torch"] + (["triton"] if (INTERPRETING or HAS_CUDA) else [])


def speed_op(impl: str, rows_budget: int | None = None, v: int | None = None, itemsize: int = 4):
    """The op in speed mode; ``rows_budget`` rows of q per chunk (in bytes: rows x V x itemsize)."""
    chunk = None if rows_budget is None else rows_budget * v * itemsize
    return partial(linear_cross_entropy, impl=impl, mode="speed", speed_chunk_bytes=chunk)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "reduction,shift,softcap", list(itertools.product(["mean", "sum"], [False, True], [None, 4.0]))
)
def test_matrix_several_chunks(impl, reduction, shift, softcap):
    e, c, t, _ = make_inputs((3, 13), 40, 300, torch.float32, device=DEVICE)
    op = speed_op(impl, rows_budget=16, v=304)
    check_against_oracle(op, e, c, t, None, TOL[torch.float32], reduction=reduction, shift=shift, softcap=softcap)


@pytest.mark.parametrize("impl", IMPLS)
def test_bias_and_label_smoothing(impl):
    e, c, t, b = make_inputs((37,), 67, 1003, torch.float32, bias=True, device=DEVICE)
    check_against_oracle(speed_op(impl, 16, 1008), e, c, t, b, TOL[torch.float32], label_smoothing=0.1)


@pytest.mark.parametrize("impl", IMPLS)
def test_bias_softcap_peaked(impl):
    e, c, t, b = make_inputs((45,), 32, 257, torch.float32, regime="peaked", bias=True, device=DEVICE)
    check_against_oracle(speed_op(impl), e, c, t, b, TOL[torch.float32], softcap=30.0, shift=False)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(2, 19), (4, 30)], ids=["2-chunks", "4-chunks-fp32-dc"])
def test_bf16(impl, shape):
    """bf16, several chunks: up to MAX_ROUNDED_DC_CHUNKS chunks accumulate dC in place, more in fp32."""
    e, c, t, _ = make_inputs(shape, 48, 257, torch.bfloat16, regime="peaked", device=DEVICE)
    check_against_oracle(speed_op(impl, 16, 264, 2), e, c, t, None, TOL[torch.bfloat16], shift=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_ignored(impl):
    e, c, t, _ = make_inputs((2, 7), 16, 100, torch.float32, ignore_frac=1.0, device=DEVICE)
    loss = speed_op(impl)(e, c, t)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(e.grad) == 0 and torch.count_nonzero(c.grad) == 0


@pytest.mark.skipif(not (INTERPRETING or HAS_CUDA), reason="needs CUDA or TRITON_INTERPRET=1")
def test_every_element_of_q_is_written(monkeypatch):
    """Row blocks with no counted row skip the matmul; their q rows must still be written (as zeros),
    because the gradient GEMMs read them: the buffer starts as NaN, so any unwritten element shows."""
    from cce_patch.ops.fused import speed_mode as triton_speed

    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(triton_speed, "new_q_buffer", poisoned)
    e, c, t, _ = make_inputs((100,), 24, 130, torch.float32, ignore_frac=0.0, device=DEVICE)
    t[:70] = -100
    check_against_oracle(speed_op("triton", 50, 136), e, c, t, None, TOL[torch.float32], shift=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_speed_equals_memory_mode(impl):
    e, c, t, b = make_inputs((4, 9), 32, 211, torch.float32, bias=True, device=DEVICE)
    outs = []
    for mode in ("memory", "speed"):
        for x in (e, c, b):
            x.grad = None
        loss = linear_cross_entropy(e, c, t, bias=b, shift=True, softcap=5.0, impl=impl, mode=mode)
        (loss * 0.37).backward()
        outs.append([loss.detach(), e.grad.clone(), c.grad.clone(), b.grad.clone()])
    for got, want in zip(*outs, strict=True):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6)


@pytest.mark.skipif(not (INTERPRETING or HAS_CUDA), reason="needs CUDA or TRITON_INTERPRET=1")
def test_out_of_range_rows_fall_back_to_recompute(monkeypatch):
    """A row whose loss exceeds ANCHOR_MARGIN + SPEED_RANGE would overflow q: the call must detect it and
    still be exact (loss, LSE and gradients from the recompute path)."""
    from cce_patch.ops import speed_mode as speed
    from cce_patch.ops.fused import speed_mode as triton_speed

    calls = []
    real_backward = speed.SpeedModeFunction.backward

    def spy(ctx, grad):
        calls.append(ctx.fallback)
        return real_backward(ctx, grad)

    monkeypatch.setattr(speed.SpeedModeFunction, "backward", staticmethod(spy))
    e, c, t, _ = make_inputs((40,), 32, 150, torch.float32, regime="peaked", device=DEVICE)
    with monkeypatch.context() as m:
        m.setattr(triton_speed, "ANCHOR_MARGIN", 0.0)
        m.setattr(triton_speed, "SPEED_RANGE", 2.0)  # peaked rows have losses far above 2 nats
        check_against_oracle(speed_op("triton"), e, c, t, None, TOL[torch.float32])
    e.grad = c.grad = None
    with torch.no_grad():  # a genuine case: one row's target logit 200 nats below its max
        c[t[3]] = -e[3] * (200.0 / e[3].norm() ** 2)
    check_against_oracle(speed_op("triton"), e, c, t, None, TOL[torch.float32])
    assert calls == [True, True]


@pytest.mark.parametrize("impl", IMPLS)
def test_grads_only_where_required(impl):
    e, c, t, _ = make_inputs((11,), 16, 90, torch.float32, device=DEVICE)
    c.requires_grad_(False)
    speed_op(impl)(e, c, t).backward()
    assert e.grad is not None and c.grad is None
    loss_ref, _, (e64, _, _) = dense_reference(e, c, t)
    loss_ref.backward()
    assert rel_err(e.grad, e64.grad) < TOL[torch.float32]


def test_no_grad_is_the_plain_forward():
    e, c, t, _ = make_inputs((3, 13), 40, 300, torch.float32, device=DEVICE)
    with torch.no_grad():
        fast = linear_cross_entropy(e, c, t, mode="speed")
    assert torch.equal(fast, linear_cross_entropy(e, c, t, mode="memory").detach())


@pytest.mark.parametrize("impl", IMPLS)
def test_second_backward_recomputes(impl):
    """The precomputed gradients are handed out once; a second backward through the same call
    (retain_graph=True) recomputes them as memory mode does, with its own upstream gradient."""
    e, c, t, b = make_inputs((3, 11), 16, 90, torch.float32, bias=True, device=DEVICE)
    loss = linear_cross_entropy(e, c, t, bias=b, shift=True, mode="speed", impl=impl)
    first = torch.autograd.grad(loss, (e, c, b), retain_graph=True)
    second = torch.autograd.grad(loss * 3.0, (e, c, b))
    want = torch.autograd.grad(linear_cross_entropy(e, c, t, bias=b, shift=True, mode="memory", impl=impl), (e, c, b))
    for got1, got2, ref in zip(first, second, want, strict=True):
        torch.testing.assert_close(got1, ref, rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(got2, 3.0 * ref, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(reduction="none"), ValueError, "scalar loss"),
        (dict(return_lse=True), ValueError, "LSE"),
        (dict(softcap=30.0, label_smoothing=0.1), ValueError, "rank one"),
        (dict(speed_chunk_bytes=0), ValueError, "positive"),
        (dict(mode="fast"), ValueError, "mode must be one of"),
    ],
)
def test_bad_options_are_refused(kwargs, err, match):
    e, c, t, _ = make_inputs((5,), 8, 20, torch.float32, device=DEVICE)
    with pytest.raises(err, match=match):
        linear_cross_entropy(e, c, t, **{"mode": "speed", **kwargs})


def test_fp16_is_refused():
    e, c, t, _ = make_inputs((5,), 8, 20, torch.float16, device=DEVICE)
    with pytest.raises(TypeError, match="bf16 or fp32"):
        linear_cross_entropy(e, c, t, mode="speed")


@pytest.mark.skipif(not (INTERPRETING or HAS_CUDA), reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("tma,flat", [(True, True), (True, False), (False, False)],
                         ids=["tma-flat", "tma-nested", "pointers"])
def test_q_store_paths(tma, flat, monkeypatch):
    """q leaves the kernel through the copy engine (descriptor store) or plain pointer stores, from either
    forward loop structure: each against the oracle, with a fully ignored row block and a ragged vocabulary."""
    from cce_patch.ops.fused import lse_kernel, tiles

    monkeypatch.setattr(tiles, "USE_TMA", tma)
    monkeypatch.setattr(lse_kernel, "FWD_FLAT_LOOP", flat)
    e, c, t, b = make_inputs((2, 41), 32, 211, torch.float32, bias=True, device=DEVICE)
    t[0, :36] = -100
    check_against_oracle(speed_op("triton", 40, 216), e, c, t, b, TOL[torch.float32], shift=True, softcap=5.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_many_rows_share_few_targets(impl):
    """Frequent tokens: the target terms of many rows are summed per distinct target (in fp32) before they
    reach dC; the first and last class are among them."""
    e, c, t, b = make_inputs((3, 29), 24, 300, torch.float32, bias=True, ignore_frac=0.1, device=DEVICE)
    choices = torch.tensor([0, 17, 299], device=t.device)
    t = torch.where(t == -100, t, choices[torch.randint(0, 3, t.shape, device=t.device)])
    check_against_oracle(speed_op(impl, 32, 304), e, c, t, b, TOL[torch.float32], shift=True)


@pytest.mark.skipif(not (INTERPRETING or HAS_CUDA), reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shift,softcap,bias", [(False, None, False), (True, 3.0, True)])
def test_row_prep_kernel(dtype, shift, softcap, bias):
    """The one-launch row preparation against torch: counted targets after the shift (ignore_index elsewhere,
    also for out-of-range targets, which must not be read) and anchor = softcap(e . c_t + b_t) + margin, +inf on
    rows that do not count. D = 300 spans three 128-wide steps, the last partial; N = 50 ends mid-block."""
    from cce_patch.ops.fused.row_prep_kernel import prepare_rows
    from cce_patch.ops.spec import LossSpec, effective_targets

    g = torch.Generator().manual_seed(5)
    e = torch.randn(50, 300, generator=g).to(DEVICE, dtype)
    c = torch.randn(70, 300, generator=g).div(4).to(DEVICE, dtype)
    b = torch.randn(70, generator=g).to(DEVICE, dtype) if bias else None
    t = torch.randint(0, 70, (50,), generator=g).to(DEVICE)
    t[[3, 17, 31]] = -100
    t[8], t[40] = 70, -5  # out of range: treated as not counted
    spec = LossSpec(softcap=softcap, shift_period=10 if shift else 0)
    tgt, anchor = prepare_rows(e, c, b, t, spec, 40.0)
    want_t = effective_targets(t, spec)
    want_t = torch.where((want_t >= 0) & (want_t < 70), want_t, torch.full_like(want_t, -100))
    ok = want_t != -100
    safe = torch.where(ok, want_t, 0)
    z = (e.double() * c.double()[safe]).sum(-1) + (b.double()[safe] if bias else 0.0)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    want_m = torch.where(ok, z + 40.0, torch.full_like(z, float("inf")))
    assert torch.equal(tgt, want_t)
    assert torch.equal(torch.isinf(anchor), ~ok)
    torch.testing.assert_close(anchor[ok].double(), want_m[ok], rtol=1e-5, atol=1e-4)
