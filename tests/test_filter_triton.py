"""Gradient filtering (``filter_eps``) on the Triton backend's speed mode (``fused/filter_plan.py``,
``fused/sparse_grads.py``; memory mode's is test_memory_filter_triton.py): the proven bound of
``ops/filtering.py`` against the fp64 oracle, row by row for dE and in norm for dC and dbias; that skipping
happens where it should (and the row order groups confident rows), and not on flat rows; the block-sparse and
the dense-with-zeroed-tiles products agree; the tile masses of the storing kernel; the routing of filtered
calls.

The Triton path groups rows by confidence, the torch path by position, so their filtered gradients differ;
each is compared with the exact fp64 gradient and its bound, not with the other.

Under TRITON_INTERPRET=1 the tensors live on the CPU; on a CUDA machine without it (tests/gpu/run_all.sh's
native pass) they live on the GPU and the kernels run compiled."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import HAS_CUDA, INTERPRETING
from oracle import dense_reference, make_inputs
from test_ops_filter import RTOL, _effective_targets
from test_ops_filter import confident_inputs as _confident_inputs

from cce_patch import linear_cross_entropy
from cce_patch.ops import backends, resolve_impl
from cce_patch.ops.filtering import BM, BV, FilterCounter, GradFilter
from cce_patch.ops.fused import lse_kernel, tiles
from cce_patch.ops.fused import speed_mode as fused_speed
from cce_patch.ops.fused.filter_plan import decide_chunk, tile_masses_from_sums
from cce_patch.ops.fused.lse_kernel import launch_lse_forward
from cce_patch.ops.spec import LossSpec

UPSTREAM = 1.7
DEVICE = "cuda" if HAS_CUDA and not INTERPRETING else "cpu"
pytestmark = pytest.mark.skipif(not (INTERPRETING or HAS_CUDA), reason="Triton needs CUDA or TRITON_INTERPRET=1")


@pytest.fixture
def deterministic():
    """Bit-for-bit comparisons of two calls: on CUDA, speed mode's per-target sums (``index_add_`` into dC and
    dbias) use atomics, whose order varies between runs unless torch's deterministic mode picks its sorted
    implementation (warn_only: cuBLAS's workspace setting only warns)."""
    before, warn_before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(before, warn_only=warn_before)


def confident_inputs(*args, **kw):
    """``test_ops_filter.confident_inputs`` on the device the Triton kernels run on here."""
    return _confident_inputs(*args, device=DEVICE, **kw)


def _triton_grads(e, c, t, b, mode: str = "speed", **kw):
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in (e, c, b)]
    loss = linear_cross_entropy(leaves[0], leaves[1], t, bias=leaves[2], impl="triton", mode=mode, **kw)
    loss = loss.sum()  # reduction="none": the rows' sum, so every counted row's upstream gradient is UPSTREAM
    (loss * UPSTREAM).backward()
    return loss.detach(), [x.grad if x is not None else None for x in leaves]


def check_triton_bound(e, c, t, b, *, eps: float, reduction: str = "mean", shift: bool = False, softcap=None,
                       label_smoothing: float = 0.0, speed_chunk_bytes: int | None = None,
                       vocab_order: str = "natural", mode: str = "speed"):
    """Filtered Triton ``mode`` (speed by default; ``test_memory_filter_triton.py`` passes memory) vs the fp64
    oracle: every dE row within w_i eps max||c_v||, dC within eps sum_i w_i ||e_i||, dbias within
    eps sum_i w_i, each plus the dtype's rounding (``test_ops_filter.RTOL``).
    Returns the counter and the gradients. The vocabulary stays in the given order by default, so that the
    tile counts these tests assert are those of the inputs as written (the op's own reordering is tested
    in test_filter_order.py, and here by ``test_vocabulary_order_on_triton_keeps_the_bound``)."""
    kw = dict(reduction=reduction, shift=shift, softcap=softcap, label_smoothing=label_smoothing)
    ref, _, (e64, c64, b64) = dense_reference(e, c, t, bias=b, **kw)
    ref = ref.sum()
    (ref * UPSTREAM).backward()
    counter = FilterCounter()
    loss, got = _triton_grads(e, c, t, b, mode=mode, filter_eps=eps, filter_counter=counter,
                              speed_chunk_bytes=speed_chunk_bytes, filter_vocab_order=vocab_order, **kw)
    ref_loss = float(ref.detach())
    # the forward is exact; a sum of rows adds each row's fp32 rounding of lse - z_t (|lse| ~ 25 here: ~2e-6 each)
    atol = 1e-5 + (4e-7 * t.numel() if reduction != "mean" else 0.0)
    assert abs(float(loss) - ref_loss) <= 1e-4 * abs(ref_loss) + atol

    valid = _effective_targets(t, shift) != -100
    scale = UPSTREAM / (max(int(valid.sum()), 1) if reduction == "mean" else 1)
    w = scale * valid.double()
    d = e.shape[-1]
    rt = RTOL[e.dtype]
    de, de_ref = got[0].double().reshape(-1, d), e64.grad.reshape(-1, d)
    row_err = (de - de_ref).norm(dim=1)
    row_bound = w * eps * c.detach().double().norm(dim=1).max()
    row_tol = rt * (de_ref.norm(dim=1) + de.norm(dim=1)) + rt * 1e-3 * de_ref.norm(dim=1).max()
    assert torch.all(row_err <= row_bound + row_tol), float(((row_err - row_tol) / row_bound.clamp_min(1e-30)).max())
    assert torch.count_nonzero(de[~valid]) == 0  # rows that do not count get no gradient
    dc_err = (got[1].double() - c64.grad).norm()
    dc_bound = eps * (w * e.detach().double().reshape(-1, d).norm(dim=1)).sum()
    assert dc_err <= dc_bound + rt * c64.grad.norm(), (float(dc_err), float(dc_bound))
    if b is not None:
        db_err = (got[2].double() - b64.grad).abs().sum()
        assert db_err <= eps * w.sum() + rt * b64.grad.abs().sum(), (float(db_err), float(eps * w.sum()))
    stats = counter.stats()
    assert stats.tiles_seen > 0 and stats.max_row_dropped_mass <= eps
    return counter, got


# ------------------------------------------------------------------------------------------------ the bound


def test_one_hot_rows_keep_only_target_tiles():
    """Logits ~40 above the rest at the target: every tile but the targets' is skipped."""
    e, c, t, _ = confident_inputs(256, 32, 1000, torch.float32, alpha=40.0, hot=100, ignore_frac=0.0)
    counter, _ = check_triton_bound(e, c, t, None, eps=2.0**-10)
    blocks, tiles_ = math.ceil(256 / BM), math.ceil(1000 / BV)
    assert counter.tiles_skipped == blocks * (tiles_ - 1)  # the 100 hot targets all sit in tile 0


def test_vocabulary_order_on_triton_keeps_the_bound():
    """The default order (mean logit) on the Triton path: a permutation of c's rows around the filtered call,
    undone on dC; the bound holds against the oracle of the inputs as given, and LM-like rows skip."""
    e, c, t, _ = confident_inputs(256, 32, 1000, torch.float32, alpha=40.0, hot=100, ignore_frac=0.1)
    counter, _ = check_triton_bound(e, c, t, None, eps=2.0**-10, vocab_order="mean_logit")
    assert counter.tiles_skipped > 0


def test_flat_rows_skip_nothing_and_equal_exact(deterministic):
    """Every tile holds far more than eps of some row: nothing skipped, the dense GEMMs run on an unchanged q,
    and the gradients are the exact path's bit for bit."""
    e, c, t, b = make_inputs((256,), 32, 1000, torch.float32, bias=True, device=DEVICE)
    counter, got = check_triton_bound(e, c, t, b, eps=2.0**-8)
    assert counter.tiles_skipped == 0
    _, exact = _triton_grads(e, c, t, b)
    assert all(torch.equal(x, y) for x, y in zip(got, exact, strict=True))


def test_row_order_groups_confident_rows(monkeypatch):
    """Flat and confident rows interleaved: consecutive blocks would all hold a flat row and skip nothing;
    sorted by confidence, the confident rows fill blocks of their own, which skip, on both backends (one rule)."""
    flat = torch.zeros(256, dtype=torch.bool)
    flat[::2] = True
    e, c, t, _ = confident_inputs(256, 32, 1000, torch.float32, alpha=24.0, hot=100, flat_rows=flat, ignore_frac=0.0)
    monkeypatch.setattr(fused_speed, "DENSE_KEPT_FRACTION", 1.0)  # apply every skip the rule allows, as torch does
    counter, _ = check_triton_bound(e, c, t, None, eps=2.0**-8, speed_chunk_bytes=2**20)  # one chunk, two blocks
    torch_path = FilterCounter()
    linear_cross_entropy(e, c, t, impl="torch", mode="speed", filter_eps=2.0**-8, filter_counter=torch_path,
                         filter_vocab_order="natural").backward()
    assert counter.tiles_seen == 2 * 4 and counter.tiles_skipped == 3  # all but the hot targets' tile
    ours, theirs = torch_path.stats(), counter.stats()
    assert (ours.tiles_seen, ours.tiles_skipped) == (theirs.tiles_seen, theirs.tiles_skipped)
    assert ours.max_row_dropped_mass == pytest.approx(theirs.max_row_dropped_mass, rel=1e-3)


@pytest.mark.parametrize(
    "options",
    [
        dict(label_smoothing=0.1, shift=True, reduction="sum"),
        dict(softcap=50.0),
        dict(speed_chunk_bytes=64 * 1000 * 2),  # 64-row chunks: several chunks, blocks cut short, fp32 dC
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
@pytest.mark.parametrize("mass_from_stored", [True, False], ids=["stored-masses", "fp32-masses"])
def test_bound_with_options(options, mass_from_stored, monkeypatch):
    """The bound with either source of the tile masses (``lse_kernel.MASS_FROM_STORED``): the sums of the
    stored q, or the kernel's fp32 sums with the rounding margin (bf16 and softcap rows are where they differ)."""
    monkeypatch.setattr(lse_kernel, "MASS_FROM_STORED", mass_from_stored)
    shift = options.get("shift", False)
    dtype = torch.bfloat16 if "speed_chunk_bytes" in options else torch.float32
    e, c, t, b = confident_inputs(256, 32, 1000, dtype, alpha=24.0, hot=100, bias=True, ignore_frac=0.2)
    if shift:
        e, t = e.detach().view(2, 128, 32).requires_grad_(), t.view(2, 128)
    counter, _ = check_triton_bound(e, c, t, b, eps=2.0**-8, **options)
    assert counter.skipped_fraction > 0.3, counter


def test_dense_chunks_are_exact_and_counted_as_such(monkeypatch, deterministic):
    """Where a chunk keeps most pairs (``DENSE_KEPT_FRACTION``), cuBLAS forms its gradients from all of q:
    skipping there would save no time, so nothing is skipped, the gradients are bit for bit those of the exact
    call, and the counter says 0 skipped. The same decision run through the block-sparse kernels skips (and
    counts) the pairs, within the bound."""
    e, c, t, b = confident_inputs(256, 32, 1000, torch.float32, alpha=24.0, hot=100, bias=True)
    monkeypatch.setattr(fused_speed, "DENSE_KEPT_FRACTION", 1.0)
    sparse, sparse_grads = check_triton_bound(e, c, t, b, eps=2.0**-8)
    assert sparse.skipped_fraction > 0.5
    monkeypatch.setattr(fused_speed, "DENSE_KEPT_FRACTION", -1.0)
    dense, dense_grads = check_triton_bound(e, c, t, b, eps=2.0**-8)
    assert dense.tiles_seen == sparse.tiles_seen and dense.tiles_skipped == 0
    assert dense.stats().max_row_dropped_mass == 0.0
    _, exact = _triton_grads(e, c, t, b)
    assert all(torch.equal(x, y) for x, y in zip(dense_grads, exact, strict=True))
    assert not torch.equal(sparse_grads[0], exact[0])  # the sparse path did leave pairs out
    torch.testing.assert_close(sparse_grads[2], exact[2], rtol=0, atol=0)  # dbias: exact on both paths


# ------------------------------------------------------------------------------------------------ the pieces


@pytest.mark.parametrize("mass_from_stored", [True, False])
def test_storing_kernel_tile_masses(mass_from_stored, monkeypatch):
    """The storing kernel's optional output: per row and BLOCK_N-wide tile, the sum of the q it stored (fp32
    inputs without a soft cap: the stored values are the fp32 ones, so both sources give the same sums)."""
    monkeypatch.setattr(lse_kernel, "MASS_FROM_STORED", mass_from_stored)
    e, c, t, _ = make_inputs((96,), 32, 300, torch.float32, regime="peaked", device=DEVICE)
    n, v = 96, 300
    q = torch.full((n, v), math.nan, device=DEVICE)
    anchor = torch.where(t != -100, 5.0 + (e.detach() * c.detach()[t.clamp_min(0)]).sum(1), math.inf)
    tgt = torch.where(t != -100, t, -100)
    block_n = tiles.tile_config(torch.float32, "store").block_n
    mass = torch.full((n, math.ceil(v / block_n)), math.nan, device=DEVICE)
    launch_lse_forward(e.detach(), c.detach(), None, tgt, LossSpec(), q=q, anchor=anchor, mass=mass)
    pad = mass.shape[1] * block_n - v
    want = torch.cat((q, q.new_zeros(n, pad)), 1).view(n, -1, block_n).sum(-1)
    torch.testing.assert_close(mass, want, rtol=1e-5, atol=0.0)
    assert torch.all(mass[t == -100] == 0)
    coarse = tile_masses_from_sums(mass, torch.ones(n, device=DEVICE), v, block_n)
    torch.testing.assert_close(coarse, torch.cat((q, q.new_zeros(n, 2 * BV - v)), 1).view(n, 2, BV).sum(-1))


def test_decision_lists_follow_the_mask():
    """``decide_chunk``: rows ordered by the entropy of their tile masses (ignored rows first), the rule applied
    to blocks of that order, and index lists that hold exactly the kept pairs, ascending."""
    gen = torch.Generator().manual_seed(1)
    rows, vocab = 300, 1800
    tiles_ = math.ceil(vocab / BV)
    # per-tile masses: two thirds of the rows concentrated on tile 0 or 1, the rest spread, in a random order
    logits = 2.0 * torch.randn(rows, tiles_, generator=gen)
    confident = torch.rand(rows, generator=gen) < 2 / 3
    logits[torch.arange(rows), torch.arange(rows) % 2] += torch.where(confident, 30.0, 0.0)
    p = torch.softmax(logits, 1)
    targets = torch.randint(0, 2 * BV, (rows,), generator=gen)
    valid = torch.rand(rows, generator=gen) > 0.1
    a = valid.float()
    counter = FilterCounter()
    plan = decide_chunk(p * valid[:, None], a, targets, valid, vocab, BV, GradFilter(2.0**-6, counter))
    plan.count(counter, applied=True)
    order = plan.order.long()
    assert sorted(order.tolist()) == list(range(rows))
    assert torch.all(~valid[order[: int((~valid).sum())]])
    m = p * valid[:, None]
    ent = -(m * m.clamp_min(1e-30).log()).sum(1)
    assert torch.all(ent[order][int((~valid).sum()):].diff() >= 0)
    kept = ~plan.skipped
    for blk in range(plan.blocks):
        want = torch.nonzero(kept[blk]).flatten().tolist()
        assert plan.tiles_of_block[blk, : int(plan.tile_counts[blk])].tolist() == want
        members = order[blk * BM:(blk + 1) * BM]
        for i in members[valid[members]].tolist():
            assert not plan.skipped[blk, targets[i] // BV]  # target tiles are protected
        assert m[members][:, plan.skipped[blk]].sum(1).max() <= 2.0**-6
    for k in range(tiles_):
        want = torch.nonzero(kept[:, k]).flatten().tolist()
        assert plan.blocks_of_tile[k, : int(plan.block_counts[k])].tolist() == want
    row_skip = plan.row_skipped()
    assert torch.equal(row_skip[order[:BM]], plan.skipped[0].expand(BM, -1))
    assert counter.tiles_seen == plan.skipped.numel() and counter.tiles_skipped == int(plan.skipped.sum()) > 0


def test_decision_makes_the_host_wait_for_nothing():
    """``decide_chunk`` runs between a chunk's storing kernel and its gradient launches: an op that reads a value
    back (nonzero() behind boolean indexing, item(), tolist()) would make the host wait for the storing kernel
    there, with the GPU idle after it. The speed path's one read per chunk is its own (the kept-pair count)."""
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator().manual_seed(2)
    rows, vocab = 300, 1800
    tiles_ = math.ceil(vocab / BV)
    logits = 2.0 * torch.randn(rows, tiles_, generator=gen)
    logits[torch.arange(rows), torch.arange(rows) % 2] += 30.0  # confident rows: their mass in tile 0 or 1
    p = torch.softmax(logits, 1)
    targets = torch.randint(0, 2 * BV, (rows,), generator=gen)
    valid = torch.rand(rows, generator=gen) > 0.1
    counter = FilterCounter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        plan = decide_chunk(p * valid[:, None], valid.float(), targets, valid, vocab, BV, GradFilter(2.0**-6, counter))
        plan.count(counter, applied=True)
    reads = {"aten::nonzero", "aten::item", "aten::_local_scalar_dense", "aten::tolist"}
    assert not [ev.key for ev in prof.key_averages() if ev.key in reads]
    assert counter.tiles_skipped > 0  # the decision did decide something


def test_second_call_chooses_from_the_first_calls_counts(monkeypatch):
    """The dense/sparse choice reads counts from the host: the first call of a shape its own (the one host
    sync of the choice), later calls the previous call's of the same chunk, without waiting; the bound holds
    either way, and the counts remembered are the last call's."""
    from cce_patch.ops.fused import filter_plan

    reads = []
    real_read = filter_plan._read_now
    monkeypatch.setattr(filter_plan, "_read_now", lambda counts: reads.append(1) or real_read(counts))

    e, c, t, _ = confident_inputs(256, 32, 1000, torch.float32, alpha=24.0, hot=100, ignore_frac=0.0)
    first, _ = check_triton_bound(e, c, t, None, eps=2.0**-8)
    chunks = len(reads)  # each chunk read its own counts
    assert chunks >= 1 and first.skipped_fraction > 0.3 and len(filter_plan._last_counts) == chunks
    reads.clear()
    flat = make_inputs((256,), 32, 1000, torch.float32, device=DEVICE)[:3]  # same shape, nothing skippable
    second, _ = check_triton_bound(*flat, None, eps=2.0**-8)
    # the choice came from the first call's (sparse-worthy) counts: run block-sparse, skipping nothing, exactly
    assert second.tiles_skipped == 0 and second.tiles_seen == first.tiles_seen
    assert not reads  # the chunk's own counts were not waited for
    remembered = [host.tolist()[0] for host, _ in filter_plan._last_counts.values()]
    assert len(remembered) == chunks and sum(remembered) == second.tiles_seen  # every pair kept: next time dense


def test_shapes_with_nothing_to_skip_run_as_the_exact_call(monkeypatch, deterministic):
    """After a deciding call ran every chunk dense, the same shape runs as the exact call (no tile masses, no
    decisions; bit for bit the exact gradients, counted as seen with nothing skipped) until the probe, which
    decides again and brings the filter back for inputs that have become skippable."""
    from cce_patch.ops.fused import filter_plan

    decisions = []
    real_decide = fused_speed.decide_chunk
    monkeypatch.setattr(fused_speed, "decide_chunk", lambda *a, **k: decisions.append(1) or real_decide(*a, **k))
    monkeypatch.setattr(filter_plan, "PROBE_EVERY", 4)
    from cce_patch.ops import api

    orders = []
    real_order = api.order_vocabulary
    monkeypatch.setattr(api, "order_vocabulary", lambda *a, **k: orders.append(1) or real_order(*a, **k))
    flat = make_inputs((256,), 32, 1000, torch.float32, device=DEVICE)[:3]
    confident = confident_inputs(256, 32, 1000, torch.float32, alpha=24.0, hot=100, ignore_frac=0.0)[:3]
    first, _ = check_triton_bound(*flat, None, eps=2.0**-8)
    chunks = len(decisions)
    assert chunks >= 1 and first.tiles_skipped == 0
    decisions.clear()
    counts = []
    for _ in range(3):  # bypassed: exact, nothing decided, yet counted
        counter, got = check_triton_bound(*confident, None, eps=2.0**-8)
        counts.append((counter.tiles_seen, counter.tiles_skipped))
    _, exact = _triton_grads(*confident, None)
    assert all(torch.equal(x, y) for x, y in zip(got[:2], exact[:2], strict=True))
    assert not decisions and counts == [(first.tiles_seen, 0)] * 3
    orders.clear()
    check_triton_bound(*confident, None, eps=2.0**-8, vocab_order="mean_logit")  # nor is the vocabulary ordered
    assert not decisions and not orders
    probe, _ = check_triton_bound(*confident, None, eps=2.0**-8)  # the 5th call decides again: skips
    assert len(decisions) == chunks and probe.skipped_fraction > 0.3


def test_split_de_product_equals_unsplit_and_dense():
    """``sparse_de`` with a block's kept tiles shared by several programs (``de_splits``): the same product as one
    program per block and as the dense product over the kept pairs, on a plan whose counts are as uneven as
    rows grouped by confidence make them (one block keeps every tile, the others one or two)."""
    from cce_patch.ops.fused.filter_plan import ChunkFilter, _kept_lists
    from cce_patch.ops.fused.sparse_grads import de_splits, sparse_de

    gen = torch.Generator().manual_seed(4)
    rows, vocab, d = 3 * BM + 40, 7 * BV + 50, 48
    tiles_, blocks = math.ceil(vocab / BV), math.ceil(rows / BM)
    q, c = torch.rand(rows, vocab, generator=gen), torch.randn(vocab, d, generator=gen)
    skipped = torch.ones(blocks, tiles_, dtype=torch.bool)
    skipped[0] = False  # the flat block keeps everything
    skipped[1, 3] = skipped[2, 0] = skipped[2, 7] = skipped[3, 5] = False
    order = torch.randperm(rows, generator=gen).to(torch.int32)
    tiles_of_block, tile_counts = _kept_lists(~skipped)
    blocks_of_tile, block_counts = _kept_lists((~skipped).T)
    plan = ChunkFilter(*(x.to(DEVICE) for x in (order, skipped, tiles_of_block, tile_counts, blocks_of_tile,
                                                   block_counts, torch.zeros(()))))
    q, c = q.to(DEVICE), c.to(DEVICE)
    kept_q = q.clone()
    row_skip = plan.row_skipped().repeat_interleave(BV, 1)[:, :vocab]
    kept_q[row_skip] = 0.0
    dense = kept_q.double() @ c.double()
    splits = de_splits(int(tile_counts.sum()), int(tile_counts.max()), blocks)
    assert splits > 1
    one, split = sparse_de(q, c, plan), sparse_de(q, c, plan, splits)
    # fp32 sums of up to `vocab` products (plus `splits` partial sums): within n u (|Q| @ |C|) of the exact product,
    # where a wrongly kept or dropped tile would be off by a whole tile's contribution
    bound = (vocab + splits) * 2.0**-24 * (kept_q.abs().double() @ c.abs().double())
    assert torch.all((one.double() - dense).abs() <= bound)
    assert torch.all((split.double() - dense).abs() <= bound)
    assert de_splits(8, 2, 4) == 1  # even counts: one program per block


# ------------------------------------------------------------------------------------------------ routing


def test_routing_of_filtered_calls(monkeypatch):
    """auto on CUDA takes Triton for bf16/fp32 (speed mode where it can run the call, else memory mode:
    ``test_memory_filter_triton.py``); mode='speed' where speed mode cannot run the call goes to the torch path
    (warning) or is refused with impl='triton', naming the reason; fp16 likewise."""
    monkeypatch.setattr(backends, "_triton_available", lambda: True)
    cuda = torch.device("cuda")
    assert resolve_impl("auto", cuda, torch.bfloat16, filtered=True) == "triton"
    assert resolve_impl("auto", cuda, torch.bfloat16, filtered=True, mode="speed") == "triton"
    assert backends.filtered_mode("auto", "triton", True) == "speed"
    assert backends.filtered_mode("auto", "torch", True) == "auto"
    assert backends.filtered_mode("auto", "triton", False) == "auto"
    for kw in (dict(reduction="none"), dict(return_lse=True)):
        with pytest.warns(UserWarning, match="cannot filter this call"):
            assert resolve_impl("auto", cuda, torch.bfloat16, filtered=True, mode="speed", **kw) == "torch"
        with pytest.raises(ValueError, match="cannot filter this call.*impl='torch'"):
            resolve_impl("triton", cuda, torch.bfloat16, filtered=True, mode="speed", **kw)
    with pytest.warns(UserWarning, match="fp16"):
        assert resolve_impl("auto", cuda, torch.float16, filtered=True) == "torch"
    assert resolve_impl("auto", torch.device("cpu"), torch.bfloat16, filtered=True) == "torch"


def test_auto_mode_takes_speed_mode_when_filtering_on_triton():
    """mode='auto' with a filter on Triton: speed mode (the one in which Triton filters), whatever the size."""
    e, c, t, _ = confident_inputs(128, 32, 600, torch.float32, alpha=24.0)
    counter = FilterCounter()
    linear_cross_entropy(e, c, t, impl="triton", filter_eps=2.0**-8, filter_counter=counter).backward()
    assert counter.tiles_seen % math.ceil(600 / BV) == 0 and counter.tiles_skipped > 0
