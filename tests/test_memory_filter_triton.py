"""Gradient filtering in the Triton backend's memory mode (``fused/memory_filter.py``, ``fused/pair_grads.py``):
the proven bound against the fp64 oracle with every option memory mode takes (per-row reductions and the LSE's
gradient included), the kept pairs' products against the fp64 gradient with exactly those pairs dropped, the
forward's log tile masses, batching over tiles, the exact fallback where most pairs are kept, and the routing.

Under TRITON_INTERPRET=1 the tensors live on the CPU; on a CUDA machine without it (tests/gpu/run_all.sh's
native pass) they live on the GPU and the kernels run compiled."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import HAS_CUDA, INTERPRETING
from oracle import dense_reference, make_inputs
from test_filter_triton import DEVICE, check_triton_bound, confident_inputs
from test_ops_filter import RTOL

from cce_patch import linear_cross_entropy
from cce_patch.ops import backends
from cce_patch.ops.filtering import BM, BV, FilterCounter, GradFilter, rows_skipped
from cce_patch.ops.fused import memory_filter, memory_mode, tiles
from cce_patch.ops.fused.lse_kernel import launch_lse_forward
from cce_patch.ops.spec import LossSpec

pytestmark = pytest.mark.skipif(not (INTERPRETING or HAS_CUDA), reason="Triton needs CUDA or TRITON_INTERPRET=1")


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(label_smoothing=0.1, shift=True, reduction="sum"),
        dict(softcap=50.0),
        dict(reduction="none"),
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain",
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_memory_mode_bound_with_options(options, dtype):
    e, c, t, b = confident_inputs(256, 32, 1000, dtype, alpha=24.0, hot=100, bias=True, ignore_frac=0.2)
    if options.get("shift"):
        e, t = e.detach().view(2, 128, 32).requires_grad_(), t.view(2, 128)
    counter, _ = check_triton_bound(e, c, t, b, eps=2.0**-8, mode="memory", **options)
    assert counter.skipped_fraction > 0.3, counter


def test_memory_mode_bound_with_the_lse_gradient():
    """return_lse: each row's upstream weight is |g_i + h_i|, and the filter keeps the bound with it."""
    e, c, t, b = confident_inputs(256, 32, 1000, torch.float32, alpha=24.0, hot=100, bias=True, ignore_frac=0.2)
    eps, h = 2.0**-8, 0.3
    ref, ref_lse, (e64, c64, b64) = dense_reference(e, c, t, bias=b, reduction="none", return_lse=True)
    (ref.sum() + h * ref_lse.sum()).backward()
    leaves = [x.detach().clone().requires_grad_() for x in (e, c, b)]
    counter = FilterCounter()
    loss, lse = linear_cross_entropy(leaves[0], leaves[1], t, bias=leaves[2], impl="triton", mode="memory",
                                     reduction="none", return_lse=True, filter_eps=eps, filter_counter=counter,
                                     filter_vocab_order="natural")
    (loss.sum() + h * lse.sum()).backward()
    valid = t != -100
    w = (1.0 + h) * valid.double()
    row_err = (leaves[0].grad.double() - e64.grad).norm(dim=1)
    tol = RTOL[torch.float32] * e64.grad.norm(dim=1)
    assert torch.all(row_err <= w * eps * c.detach().double().norm(dim=1).max() + tol)
    dc_err = (leaves[1].grad.double() - c64.grad).norm()
    assert dc_err <= eps * (w * e.detach().double().norm(dim=1)).sum() + RTOL[torch.float32] * c64.grad.norm()
    assert counter.skipped_fraction > 0.3 and counter.max_row_dropped_mass <= eps


def _dropped_reference(e, c, t, b, plan, spec: LossSpec, upstream: float):
    """fp64 dE, dC, dbias of the mean loss times ``upstream`` with the softmax terms of ``plan``'s skipped pairs
    left out (the target and smoothing terms kept): what the pair kernels compute, up to fp32 rounding."""
    e64, c64 = e.detach().double(), c.detach().double()
    z = e64 @ c64.T + (b.detach().double() if b is not None else 0.0)
    p = torch.softmax(z, dim=1)
    valid = t != spec.ignore_index
    g = upstream / valid.sum() * valid.double()
    per_row = rows_skipped(plan.skipped, plan.order)  # (N, T)
    keep = (~per_row).repeat_interleave(BV, 1)[:, : c.shape[0]]
    dz = g[:, None] * p * keep
    dz[valid, t[valid]] -= g[valid]
    # fp32 scale of each entry's error: z ~ 24 carries ~ulp(24) = 2^-19 relative error into p, and the target
    # entry g (p_t - 1) of a confident row cancels; so the products' errors scale with |g p| + |g| at the target
    size = g[:, None] * p * keep
    size[valid, t[valid]] += g[valid]
    return (dz @ c64, size @ c64.abs()), (dz.T @ e64, size.T @ e64.abs()), (dz.sum(0), size.sum(0))


def test_kept_pairs_equal_the_fp64_gradient_without_the_skipped_ones(monkeypatch):
    """The pair kernels' dE, dC, dbias against the fp64 gradient with exactly the decided pairs dropped, over
    several batches (a budget of two slots), with rows that do not count and a partial last tile."""
    e, c, t, b = confident_inputs(300, 40, 1900, torch.float32, alpha=24.0, hot=700, bias=True, ignore_frac=0.2)
    spec, eps, upstream = LossSpec(), 2.0**-8, 1.7
    monkeypatch.setattr(memory_mode, "DS_CHUNK_BYTES", 2 * BM * BV * 4)
    e_, c_, b_ = (x.detach().clone().requires_grad_() for x in (e, c, b))
    loss = linear_cross_entropy(e_, c_, t, bias=b_, impl="triton", mode="memory", filter_eps=eps,
                                filter_vocab_order="natural")
    (loss * upstream).backward()
    _, lse, log_mass = memory_filter.forward(e.detach(), c.detach(), b.detach(), t, spec)
    valid = t != -100
    plan = memory_filter._decide(log_mass, lse, torch.where(valid, t, -100), valid, 1900, GradFilter(eps), e.dtype)
    assert 0 < int(plan.skipped.sum()) < plan.skipped.numel()
    batches = memory_filter.tile_batches(plan.block_counts.tolist(), 2)
    assert len(batches) >= 3
    for got, (want, size) in zip((e_.grad, c_.grad, b_.grad), _dropped_reference(e, c, t, b, plan, spec, upstream),
                                 strict=True):
        # a pair left in or out wrongly would be off by ~eps-sized masses, far above 2^-16 of these scales
        assert torch.all((got.double() - want).abs() <= 2.0**-16 * size), float(((got.double() - want).abs() / size).max())


def test_dense_fallback_is_the_exact_backward(monkeypatch):
    """Where most pairs are kept (``DENSE_KEPT_FRACTION``) the exact memory-mode backward runs: bit for bit the
    unfiltered gradients, and the counter says nothing was skipped."""
    e, c, t, b = confident_inputs(256, 32, 1000, torch.float32, alpha=24.0, hot=100, bias=True)
    monkeypatch.setattr(memory_filter, "DENSE_KEPT_FRACTION", -1.0)
    counter = FilterCounter()
    grads = []
    for kw in (dict(filter_eps=2.0**-8, filter_counter=counter, filter_vocab_order="natural"), {}):
        leaves = [x.detach().clone().requires_grad_() for x in (e, c, b)]
        linear_cross_entropy(leaves[0], leaves[1], t, bias=leaves[2], impl="triton", mode="memory", **kw).backward()
        grads.append([x.grad for x in leaves])
    assert all(torch.equal(x, y) for x, y in zip(*grads, strict=True))
    assert counter.tiles_seen > 0 and counter.tiles_skipped == 0


def test_flat_rows_skip_nothing():
    e, c, t, _ = make_inputs((256,), 32, 1000, torch.float32, regime="flat", device=DEVICE)
    counter, _ = check_triton_bound(e, c, t, None, eps=2.0**-12, mode="memory")
    assert counter.tiles_skipped == 0


def test_forward_log_tile_masses():
    """The forward's optional output without q: per row and BLOCK_N-wide tile, log sum_j exp(z_ij); exp(that -
    lse) is the tile's softmax mass (fp64 reference), and the loss path's outputs are unchanged by it."""
    e, c, t, b = make_inputs((96,), 32, 300, torch.float32, regime="peaked", device=DEVICE, bias=True)
    spec = LossSpec()
    loss, lse, log_mass = memory_filter.forward(e.detach(), c.detach(), b.detach(), t, spec)
    plain_loss, plain_lse = memory_mode.forward(e.detach(), c.detach(), b.detach(), t, spec)
    assert torch.equal(loss, plain_loss) and torch.equal(lse, plain_lse)
    block_n = tiles.tile_config(torch.float32, "forward").block_n
    z = e.detach().double() @ c.detach().double().T + b.detach().double()
    p = torch.softmax(z, 1)
    pad = log_mass.shape[1] * block_n - 300
    want = torch.cat((p, p.new_zeros(96, pad)), 1).view(96, -1, block_n).sum(-1)
    valid = t != -100
    got = torch.exp(log_mass.double() - lse.double()[:, None])
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-12)


def test_forward_log_masses_do_not_change_the_loss_kernel():
    """Without ``mass`` the launch is the loss path's (the same partials, bit for bit, as with it)."""
    e, c, t, _ = make_inputs((64,), 32, 300, torch.float32, regime="peaked", device=DEVICE)
    block_n = tiles.tile_config(torch.float32, "forward").block_n
    mass = torch.empty((64, math.ceil(300 / block_n)), device=DEVICE)
    with_mass = launch_lse_forward(e.detach(), c.detach(), None, t, LossSpec(), mass=mass)
    without = launch_lse_forward(e.detach(), c.detach(), None, t, LossSpec())
    assert all(torch.equal(x, y) for x, y in zip(with_mass, without, strict=True))


def test_tile_batches_cover_every_tile_once():
    counts = [3, 0, 5, 1, 1, 9, 0, 2]
    batches = memory_filter.tile_batches(counts, 6)
    assert batches[0][0] == 0 and batches[-1][1] == len(counts)
    assert all(a[1] == b[0] for a, b in zip(batches, batches[1:], strict=False))
    for k0, k1 in batches:  # within the budget, or a single tile over it
        assert sum(counts[k0:k1]) <= 6 or k1 - k0 == 1
    assert memory_filter.tile_batches([0, 0], 4) == [(0, 2)]


def test_routing_of_filtered_memory_mode_calls(monkeypatch):
    """Triton filters in memory mode too: mode='memory', and auto where speed mode cannot run the call
    (reduction='none', return_lse) take it; fp16 takes the torch path (warning) or is refused with impl='triton'."""
    monkeypatch.setattr(backends, "_triton_available", lambda: True)
    cuda = torch.device("cuda")
    for kw in (dict(mode="memory"), dict(reduction="none"), dict(return_lse=True)):
        assert backends.resolve_impl("auto", cuda, torch.bfloat16, filtered=True, **kw) == "triton"
        assert backends.resolve_impl("triton", cuda, torch.bfloat16, filtered=True, **kw) == "triton"
    assert backends.filtered_mode("auto", "triton", True, torch.bfloat16, "none", False) == "memory"
    assert backends.filtered_mode("auto", "triton", True, torch.bfloat16, "mean", True) == "memory"
    assert backends.filtered_mode("auto", "triton", True, torch.bfloat16, "mean", False) == "speed"
    with pytest.warns(UserWarning, match="fp16"):
        assert backends.resolve_impl("auto", cuda, torch.float16, filtered=True, mode="memory") == "torch"
    with pytest.raises(ValueError, match="fp16 inputs"):
        backends.resolve_impl("triton", cuda, torch.float16, filtered=True, mode="memory")
    with pytest.raises(ValueError, match="reduction='none'"):
        backends.resolve_impl("triton", cuda, torch.bfloat16, filtered=True, mode="speed", reduction="none")


def test_filtered_backward_without_the_forwards_masses_is_refused():
    e, c, t, _ = make_inputs((8,), 8, 11, torch.float32, device=DEVICE)
    g = torch.ones(8, device=DEVICE)
    lse = torch.zeros(8, device=DEVICE)
    with pytest.raises(ValueError, match="tile masses"):
        memory_filter.backward(e.detach(), c.detach(), None, t, LossSpec(), lse, g, None, (True, True, False),
                               grad_filter=GradFilter(0.01))


def test_shapes_with_nothing_to_skip_run_as_the_exact_call(monkeypatch):
    """Memory mode shares speed mode's bypass: after a deciding call kept most pairs (the exact backward ran),
    the same shape runs as the exact call (no tile masses written, nothing decided; bit for bit the exact
    gradients, counted as seen with nothing skipped) until the probe decides again and skips."""
    from cce_patch.ops.fused import filter_plan

    decisions, forwards = [], []
    real_decide, real_forward = memory_filter._decide, memory_filter.forward
    monkeypatch.setattr(memory_filter, "_decide", lambda *a, **k: decisions.append(1) or real_decide(*a, **k))
    monkeypatch.setattr(filter_plan, "PROBE_EVERY", 4)
    from cce_patch.ops import backends as be

    be.get_backend.cache_clear()  # the record holds the forward: rebuild it around the counting one
    monkeypatch.setattr(memory_filter, "forward", lambda *a, **k: forwards.append(1) or real_forward(*a, **k))
    try:
        flat = make_inputs((256,), 32, 1000, torch.float32, device=DEVICE)[:3]
        confident = confident_inputs(256, 32, 1000, torch.float32, alpha=24.0, hot=100, ignore_frac=0.0)[:3]
        first, _ = check_triton_bound(*flat, None, eps=2.0**-8, mode="memory")
        assert decisions == [1] and forwards == [1] and first.tiles_skipped == 0
        decisions.clear()
        forwards.clear()
        for _ in range(4):  # bypassed (PROBE_EVERY calls): exact, no masses, nothing decided, yet counted
            counter, got = check_triton_bound(*confident, None, eps=2.0**-8, mode="memory")
            assert (counter.tiles_seen, counter.tiles_skipped) == (first.tiles_seen, 0)
        assert not decisions and not forwards
        leaves = [x.detach().clone().requires_grad_() for x in confident[:2]]
        (linear_cross_entropy(*leaves, confident[2], impl="triton", mode="memory") * 1.7).backward()
        assert all(torch.equal(x.grad, y) for x, y in zip(leaves, got[:2], strict=True))
        probe, _ = check_triton_bound(*confident, None, eps=2.0**-8, mode="memory")  # the probe decides again
        assert decisions == [1] and probe.tiles_skipped > 0
    finally:
        be.get_backend.cache_clear()


def test_filtered_backward_reads_back_only_the_counts():
    """The filtered backward's one read of the device is the per-tile pair counts (``tolist``): no ``nonzero``
    (boolean indexing), no ``item``; the pair lists are built from those counts on the device."""
    from torch.profiler import ProfilerActivity, profile

    e, c, t, _ = confident_inputs(256, 32, 1000, torch.float32, alpha=24.0, hot=100, ignore_frac=0.2)
    spec = LossSpec()
    e, c = e.detach(), c.detach()
    _, lse, log_mass = memory_filter.forward(e, c, None, t, spec)
    g = torch.full((256,), 1.0 / 256, device=DEVICE)
    counter = FilterCounter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        de, dc, _ = memory_filter.backward(e, c, None, t, spec, lse, g, None, (True, True, False),
                                           grad_filter=GradFilter(2.0**-8, counter), tile_stats=log_mass)
    reads = {"aten::nonzero", "aten::item", "aten::_local_scalar_dense"}
    assert not [ev.key for ev in prof.key_averages() if ev.key in reads]
    assert counter.tiles_skipped > 0 and de is not None and dc is not None


@pytest.mark.parametrize("mode", ["memory", "speed"])
def test_bound_under_autocast(mode):
    """fp32 leaves under bf16 autocast, on the Triton backend in either mode: the op casts to bf16 and the bound
    holds against the fp64 oracle of those bf16 values, with bf16's rounding on top; the gradients come back in
    the leaves' fp32."""
    e, c, t, b = confident_inputs(256, 32, 1000, torch.float32, alpha=24.0, hot=100, bias=True, ignore_frac=0.2)
    eps, upstream = 2.0**-8, 1.7
    e16, c16, b16 = (x.detach().to(torch.bfloat16) for x in (e, c, b))
    ref, _, (e64, c64, b64) = dense_reference(e16, c16, t, bias=b16)
    (ref * upstream).backward()
    leaves = [x.detach().clone().requires_grad_() for x in (e, c, b)]
    counter = FilterCounter()
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        loss = linear_cross_entropy(leaves[0], leaves[1], t, bias=leaves[2], impl="triton", mode=mode,
                                    filter_eps=eps, filter_counter=counter, filter_vocab_order="natural")
    (loss * upstream).backward()
    assert all(x.grad.dtype == torch.float32 for x in leaves)
    valid = t != -100
    w = upstream / int(valid.sum()) * valid.double()
    rt = RTOL[torch.bfloat16]
    de, de_ref = leaves[0].grad.double(), e64.grad
    row_err = (de - de_ref).norm(dim=1)
    row_bound = w * eps * c16.double().norm(dim=1).max()
    assert torch.all(row_err <= row_bound + rt * (de_ref.norm(dim=1) + de.norm(dim=1)) + rt * 1e-3 * de_ref.norm(dim=1).max())
    dc_err = (leaves[1].grad.double() - c64.grad).norm()
    assert dc_err <= eps * (w * e16.double().norm(dim=1)).sum() + rt * c64.grad.norm()
    assert counter.skipped_fraction > 0.3 and counter.max_row_dropped_mass <= eps
