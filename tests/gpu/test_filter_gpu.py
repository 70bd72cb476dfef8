"""Gradient filtering on the Triton backend, in speed mode (``fused/filter_plan.py``, ``fused/sparse_grads.py``)
and memory mode (``fused/memory_filter.py``, ``fused/pair_grads.py``), on CUDA, bf16,
at a shape where the kernels run their GPU tiles (128x256 store tiles, 128-row blocks, 128x64 sparse steps):
each dE row, dC and the counter against the proven bound of ``ops/filtering.py`` (fp64 oracle on the GPU),
on LM-like logits (as drawn: the op orders the vocabulary and groups the rows itself)
and on confident rows (nearly every tile skipped: the block-sparse kernels); and flat logits, where nothing is
skipped and the result is the exact mode's bit for bit.

    python -m pytest -q tests/gpu/test_filter_gpu.py
"""

from __future__ import annotations

import pytest
import torch
from oracle import dense_reference

from cce_patch import linear_cross_entropy
from cce_patch.bench.regimes import make_inputs as regime_inputs
from cce_patch.ops.filtering import FilterCounter

pytestmark = pytest.mark.gpu
SHAPE = (4096, 1024, 64000)
EPS = 2.0**-10
#: bf16 rounding on top of the bound, relative to each compared gradient's norm (as tests/test_ops_filter.py)
RTOL = 2.0**-7


def _inputs(kind: str):
    n, d, v = SHAPE
    if kind == "confident":
        g = torch.Generator(device="cuda").manual_seed(0)
        c = torch.randn(v, d, device="cuda", generator=g)
        c /= c.norm(dim=1, keepdim=True)
        t = torch.randint(0, 2000, (n,), device="cuda", generator=g)
        e = 24.0 * c[t] + 0.1 * torch.randn(n, d, device="cuda", generator=g)
        t[torch.rand(n, device="cuda", generator=g) < 0.1] = -100
        return e.bfloat16(), c.bfloat16(), t
    # as drawn: the op orders the vocabulary (filter_vocab_order's default) and groups the rows itself
    return regime_inputs(kind, n, d, v, device="cuda", dtype=torch.bfloat16)


def _op_grads(e, c, t, mode, **kw):
    e, c = e.detach().clone().requires_grad_(), c.detach().clone().requires_grad_()
    loss = linear_cross_entropy(e, c, t, impl="triton", mode=mode, **kw)
    loss.backward()
    return loss.detach(), e.grad, c.grad


@pytest.mark.parametrize("mode", ["speed", "memory"])
@pytest.mark.parametrize("kind,min_skipped", [("confident", 0.9), ("lm", 0.1), ("flat", None)])
def test_filter_bound_and_skips_gpu(kind, min_skipped, mode):
    e, c, t = _inputs(kind)
    counter = FilterCounter()
    # flat: the given vocabulary order, so that "nothing skipped" can be compared with exact bit for bit
    order = "natural" if min_skipped is None else "mean_logit"
    loss, de, dc = _op_grads(e, c, t, mode, filter_eps=EPS, filter_counter=counter, filter_vocab_order=order)
    ref, _, (e64, c64, _) = dense_reference(e, c, t)
    ref.backward()
    assert abs(float(loss) - float(ref.detach())) <= 1e-3 * abs(float(ref.detach()))
    valid = t != -100
    w = valid.double() / valid.sum()
    row_err = (de.double() - e64.grad).norm(dim=1)
    row_bound = w * EPS * c.double().norm(dim=1).max()
    row_tol = RTOL * (e64.grad.norm(dim=1) + de.double().norm(dim=1)) + RTOL * 1e-3 * e64.grad.norm(dim=1).max()
    assert torch.all(row_err <= row_bound + row_tol), float(((row_err - row_tol) / row_bound.clamp_min(1e-30)).max())
    dc_err = (dc.double() - c64.grad).norm()
    dc_bound = EPS * (w * e.double().norm(dim=1)).sum()
    assert dc_err <= dc_bound + RTOL * c64.grad.norm(), (float(dc_err), float(dc_bound))
    stats = counter.stats()
    print(f"{kind}: {stats}")
    assert stats.max_row_dropped_mass <= EPS
    if min_skipped is None:
        assert stats.tiles_skipped == 0
        _, de_x, dc_x = _op_grads(e, c, t, mode)
        assert torch.equal(de, de_x) and torch.equal(dc, dc_x)
    else:
        assert stats.skipped_fraction >= min_skipped
