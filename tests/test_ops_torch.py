"""The chunked torch path against the fp64 oracle, over the whole option matrix."""

from __future__ import annotations

import itertools
from functools import partial

import pytest
import torch
from oracle import TOL, check_against_oracle, make_inputs

from cce_patch import linear_cross_entropy
from cce_patch.ops import LossSpec, chunked_torch


def _check(e, c, t, b, tol, **kw):
    return check_against_oracle(partial(linear_cross_entropy, impl="torch"), e, c, t, b, tol, **kw)


_inputs = make_inputs


@pytest.mark.parametrize(
    "reduction,shift,softcap,smoothing",
    list(itertools.product(["mean", "sum", "none"], [False, True], [None, 4.0], [0.0, 0.1])),
)
def test_matrix_fp32(reduction, shift, softcap, smoothing):
    e, c, t, b = _inputs((3, 13), 67, 1003, torch.float32, bias=True)
    _check(e, c, t, b, TOL[torch.float32], reduction=reduction, shift=shift, softcap=softcap,
           label_smoothing=smoothing)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("regime", ["flat", "peaked"])
def test_half_dtypes(dtype, regime):
    e, c, t, _ = _inputs((37,), 67, 1003, dtype, regime=regime)
    _check(e, c, t, None, TOL[dtype], reduction="mean")


@pytest.mark.parametrize("shift", [False, True])
def test_return_lse_gradient(shift):
    e, c, t, b = _inputs((2, 11), 40, 301, torch.float32, bias=True)
    _check(e, c, t, b, TOL[torch.float32], return_lse=True, shift=shift, softcap=3.0)


def test_chunking_is_invisible():
    """Many tiny chunks give the same result as one chunk: the chunk loop has no seams."""
    e, c, t, _ = _inputs((53,), 24, 97, torch.float32)
    spec = LossSpec()
    one = chunked_torch.forward(e.detach(), c.detach(), None, t, spec, chunk_rows=1000)
    many = chunked_torch.forward(e.detach(), c.detach(), None, t, spec, chunk_rows=7)
    torch.testing.assert_close(one, many)
    grads = [
        chunked_torch.backward(e.detach(), c.detach(), None, t, spec, one[1], torch.ones(53), None,
                                 (True, True, False), chunk_rows=rows)
        for rows in (1000, 7)
    ]
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_all_ignored_mean_is_zero_with_zero_grads():
    e, c, t, _ = _inputs((2, 5), 8, 11, torch.float32, ignore_frac=1.0)
    loss = linear_cross_entropy(e, c, t, impl="torch")
    loss.backward()
    assert loss.item() == 0.0 and not torch.isnan(loss)
    assert torch.count_nonzero(e.grad) == 0 and torch.count_nonzero(c.grad) == 0


def test_shift_ignores_last_position_and_copies_nothing():
    e, c, t, _ = _inputs((2, 6), 8, 11, torch.float32, ignore_frac=0.0)
    rows = linear_cross_entropy(e, c, t, impl="torch", shift=True, reduction="none")
    assert rows.shape == t.shape
    assert torch.all(rows[:, -1] == 0) and torch.all(rows[:, :-1] > 0)


def test_grads_only_where_required():
    e, c, t, _ = _inputs((9,), 8, 11, torch.float32)
    c.requires_grad_(False)
    linear_cross_entropy(e, c, t, impl="torch").backward()
    assert e.grad is not None and c.grad is None


def test_non_contiguous_inputs():
    e, c, t, _ = _inputs((4, 7), 16, 50, torch.float32, ignore_frac=0.0)
    e_nc = e.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    c_nc = c.detach().T.contiguous().T.requires_grad_()
    t_nc = t.T.contiguous().T
    assert not e_nc.is_contiguous() and not c_nc.is_contiguous() and not t_nc.is_contiguous()
    _check(e_nc, c_nc, t_nc, None, TOL[torch.float32], shift=True)


def test_empty_input():
    e = torch.randn(0, 8, requires_grad=True)
    c = torch.randn(11, 8, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long)
    loss = linear_cross_entropy(e, c, t, impl="torch")
    loss.backward()
    assert loss.item() == 0.0 and c.grad is not None and torch.count_nonzero(c.grad) == 0
    assert linear_cross_entropy(e, c, t, impl="torch", reduction="none").shape == (0,)


def test_auto_picks_torch_on_cpu():
    from cce_patch.ops import resolve_impl

    assert resolve_impl("auto", torch.device("cpu")) == "torch"
    assert resolve_impl("auto", torch.device("cpu"), torch.bfloat16) == "torch"


@pytest.mark.parametrize("tf32_on", [False, True])
def test_auto_on_cuda_sends_ieee_fp32_to_cublas(tf32_on, tf32, monkeypatch):
    """On CUDA, ``auto`` is Triton for half types and TF32, and the torch path (cuBLAS SGEMM) for IEEE fp32,
    whose Triton products run on CUDA cores (~70x slower, KERNEL_NOTES.md v7). Only the decision is checked
    here (no GPU needed); forcing Triton for IEEE fp32 on CUDA warns."""
    from cce_patch.ops import backends, resolve_impl

    tf32.set(tf32_on)
    monkeypatch.setattr(backends, "_triton_available", lambda: True)
    cuda = torch.device("cuda")
    assert resolve_impl("auto", cuda, torch.bfloat16) == "triton"
    assert resolve_impl("auto", cuda, torch.float16) == "triton"
    assert resolve_impl("auto", cuda, torch.float32) == ("triton" if tf32_on else "torch")
    assert resolve_impl("torch", cuda, torch.float32) == "torch"
    monkeypatch.setattr(backends, "_interpreting", lambda: False)
    if tf32_on:
        assert resolve_impl("triton", cuda, torch.float32) == "triton"
    else:
        with pytest.warns(UserWarning, match="70x slower than cuBLAS"):
            assert resolve_impl("triton", cuda, torch.float32) == "triton"


def test_torch_path_chunks_are_larger_on_cuda():
    """CPU: 64 MiB of logits per chunk; CUDA: 1 GiB, so that the fp32 dC accumulator is read and written
    16 times at N=8192, V=256000 instead of 256 (524-row chunks instead of 32)."""
    assert chunked_torch.chunk_rows_for(256000, chunked_torch.default_chunk_bytes(torch.device("cpu"))) == 32
    assert chunked_torch.chunk_rows_for(256000, chunked_torch.default_chunk_bytes(torch.device("cuda"))) == 524


def test_ignored_rows_with_huge_logits_stay_finite():
    """An ignored row's logits can exceed exp's fp32 range (its stored lse is 0): its gradient must be 0,
    not inf * 0 = NaN."""
    e, c, t, _ = make_inputs((9,), 16, 50, torch.float32, ignore_frac=0.0)
    with torch.no_grad():
        e[4] *= 400.0 / e[4].norm()
        c[:5] = e[4] / e[4].norm()  # row 4's logits reach ~400
    t[4] = -100
    for mode in ("memory", "speed"):
        e.grad = c.grad = None
        check_against_oracle(partial(linear_cross_entropy, impl="torch", mode=mode), e, c, t, None,
                             TOL[torch.float32])
