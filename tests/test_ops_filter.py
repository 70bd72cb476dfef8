"""Gradient filtering (``filter_eps``, ``cce_patch/ops/filtering.py``) on the torch path: the proven bound against
the fp64 oracle on random and adversarial inputs, what is skipped, the counter, exactness when off, refusals."""

from __future__ import annotations

import math

import pytest
import torch
from oracle import dense_reference, make_inputs

from cce_patch import CCEConfig, linear_cross_entropy
from cce_patch.bench.filter_stats import sorted_problem
from cce_patch.bench.regimes import make_inputs as regime_inputs
from cce_patch.ops import backends, resolve_impl
from cce_patch.ops.filtering import BM, BUDGET_FACTOR, BV, FilterCounter

#: Rounding on top of the bound: relative to each compared gradient's own norm (the op's exact result is
#: within this of the fp64 oracle; bf16 gradients are rounded to 8 bits), plus a floor for near-zero rows.
RTOL = {torch.float32: 1e-4, torch.bfloat16: 2.0**-7}


def confident_inputs(n: int, d: int, v: int, dtype: torch.dtype, *, alpha: float = 16.0, hot: int = 300,
                     flat_rows: torch.Tensor | None = None, ignore_frac: float = 0.1, bias: bool = False,
                     seed: int = 0, device: str = "cpu"):
    """Rows close to their target's (unit) classifier row, targets among the first ``hot`` ids (a Zipf-like
    head, so the target tiles of a block are few): logit ~alpha at the target, ~N(0, (alpha/sqrt(d))^2)
    elsewhere. alpha=16 puts the non-target tiles' masses around 2^-8: some skippable, some not, and a
    dropped error large enough to see in bf16. ``flat_rows`` get logits ~N(0, 1/d): nothing skippable.
    Drawn on the CPU (the same numbers everywhere), then moved to ``device``."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(v, d, generator=g)
    c /= c.norm(dim=1, keepdim=True)
    t = torch.randint(0, hot, (n,), generator=g)
    e = alpha * c[t] + 0.1 * torch.randn(n, d, generator=g)
    if flat_rows is not None:
        e[flat_rows] = torch.randn(int(flat_rows.sum()) if flat_rows.dtype == torch.bool else len(flat_rows), d,
                                   generator=g)
    t[torch.rand(n, generator=g) < ignore_frac] = -100
    b = 0.5 * torch.randn(v, generator=g) if bias else None
    e, c, t = e.to(device, dtype).requires_grad_(), c.to(device, dtype).requires_grad_(), t.to(device)
    if b is not None:
        b = b.to(device, dtype).requires_grad_()
    return e, c, t, b


def _effective_targets(t: torch.Tensor, shift: bool, ignore_index: int = -100) -> torch.Tensor:
    if shift:
        t = torch.cat([t[..., 1:], torch.full_like(t[..., :1], ignore_index)], dim=-1)
    return t.reshape(-1)


def _grads(e, c, t, b, upstream: torch.Tensor, *, autocast: torch.dtype | None = None, **kw):
    """Gradients of ``(op(...) * upstream).sum()`` (plus the LSE term with ``return_lse``) w.r.t. fresh leaves.
    A filtered call keeps the given vocabulary order unless told otherwise: these tests are about the rule on
    the tiles as given (bit-exact when nothing is skipped, counts against an independent count); the op's
    vocabulary order (a permutation, which changes fp32 summation orders) is tests/test_filter_order.py's."""
    if kw.get("filter_eps") is not None:
        kw.setdefault("filter_vocab_order", "natural")
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in (e, c, b)]
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        out = linear_cross_entropy(leaves[0], leaves[1], t, bias=leaves[2], impl="torch", **kw)
    loss, lse = out if kw.get("return_lse") else (out, None)
    objective = (loss * upstream).sum()
    if lse is not None:
        objective = objective + (lse * LSE_UPSTREAM[: lse.numel()].view(lse.shape)).sum()
    objective.backward()
    return loss.detach(), [x.grad if x is not None else None for x in leaves]


LSE_UPSTREAM = torch.randn(4096, generator=torch.Generator().manual_seed(7)).double()


def check_bound(e, c, t, b, *, eps: float, reduction: str = "mean", shift: bool = False, softcap=None,
                label_smoothing: float = 0.0, mode: str = "memory", return_lse: bool = False,
                autocast: torch.dtype | None = None) -> tuple[FilterCounter, list, list]:
    """The op with ``filter_eps=eps`` against the fp64 oracle of the values the op computes with (after
    autocast's cast), under a random upstream gradient: every gradient within its proven bound plus rounding.
    Returns the counter, the filtered gradients and the exact op's."""
    used = autocast or e.dtype
    e_used, c_used = e.detach().to(used), c.detach().to(used)
    b_used = b.detach().to(used) if b is not None else None
    kw = dict(reduction=reduction, shift=shift, softcap=softcap, label_smoothing=label_smoothing)
    ref, ref_lse, (e64, c64, b64) = dense_reference(e_used, c_used, t, bias=b_used, return_lse=return_lse, **kw)
    gen = torch.Generator().manual_seed(3)
    upstream = torch.randn(ref.shape, generator=gen, dtype=torch.float64) if reduction == "none" else \
        torch.tensor(1.7, dtype=torch.float64)
    objective = (ref * upstream).sum()
    if return_lse:
        objective = objective + (ref_lse * LSE_UPSTREAM[: ref_lse.numel()].view(ref_lse.shape)).sum()
    objective.backward()

    counter = FilterCounter()
    loss_f, got = _grads(e, c, t, b, upstream.float(), autocast=autocast, filter_eps=eps, filter_counter=counter,
                         mode=mode, return_lse=return_lse, **kw)
    loss_x, exact = _grads(e, c, t, b, upstream.float(), autocast=autocast, mode=mode, return_lse=return_lse, **kw)
    assert torch.equal(loss_f, loss_x), "the forward must stay exact with the filter on"

    valid = _effective_targets(t, shift) != -100
    n_valid = int(valid.sum())
    g = upstream.reshape(-1) if reduction == "none" else upstream / (max(n_valid, 1) if reduction == "mean" else 1)
    w = (g + (LSE_UPSTREAM[: valid.numel()] if return_lse else 0.0)).abs() * valid.double()  # (N,)
    e_rows = e_used.double().reshape(-1, e.shape[-1])
    rt = RTOL[used]

    de, de_ref = got[0].double().reshape(-1, e.shape[-1]), e64.grad.reshape(-1, e.shape[-1])
    row_err = (de - de_ref).norm(dim=1)
    row_bound = w * eps * c_used.double().norm(dim=1).max()
    row_tol = rt * (de_ref.norm(dim=1) + de.norm(dim=1)) + rt * 1e-3 * de_ref.norm(dim=1).max()
    assert torch.all(row_err <= row_bound + row_tol), float(((row_err - row_tol) / row_bound).max())

    dc_err = (got[1].double() - c64.grad).norm()
    dc_bound = eps * (w * e_rows.norm(dim=1)).sum()
    assert dc_err <= dc_bound + rt * c64.grad.norm(), (float(dc_err), float(dc_bound))
    if b is not None:
        db_err = (got[2].double() - b64.grad).abs().sum()
        assert db_err <= eps * w.sum() + rt * b64.grad.abs().sum(), (float(db_err), float(eps * w.sum()))
    stats = counter.stats()
    assert stats.max_row_dropped_mass <= eps
    if stats.tiles_skipped and used == torch.float32:  # the filter really filters: the gradients changed
        assert not torch.equal(got[0], exact[0]) and not torch.equal(got[1], exact[1])
    return counter, got, exact


# ------------------------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("mode", ["memory", "speed"])
def test_none_is_the_exact_path_bit_for_bit(mode):
    e, c, t, b = make_inputs((3, 50), 32, 700, torch.float32, bias=True)
    up = torch.tensor(1.0)
    base = _grads(e, c, t, b, up, mode=mode, shift=True)
    off = _grads(e, c, t, b, up, mode=mode, shift=True, filter_eps=None)
    assert torch.equal(base[0], off[0]) and all(torch.equal(x, y) for x, y in zip(base[1], off[1], strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["memory", "speed"])
def test_flat_rows_skip_nothing_and_equal_exact(dtype, mode):
    """All-flat rows: every tile holds far more than eps of some row, so nothing is skipped, the rule zeroes
    nothing, and the result is the exact one bit for bit."""
    e, c, t, b = make_inputs((300,), 48, 2000, dtype, bias=True)
    counter, got, exact = check_bound(e, c, t, b, eps=2.0**-8, mode=mode)
    assert counter.tiles_seen == math.ceil(300 / BM) * math.ceil(2000 / BV) and counter.tiles_skipped == 0
    assert all(torch.equal(x, y) for x, y in zip(got, exact, strict=True))


# ------------------------------------------------------------------------------------------------ the bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["memory", "speed"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_bound_on_confident_rows(dtype, mode, reduction):
    e, c, t, b = confident_inputs(300, 64, 4000, dtype, bias=True)
    counter, got, exact = check_bound(e, c, t, b, eps=2.0**-8, reduction=reduction, mode=mode)
    assert counter.skipped_fraction > 0.25  # measured: 17 of 48 pairs (fp32, with this bias)
    assert not torch.equal(got[0], exact[0])  # visible even in bf16


@pytest.mark.parametrize("eps", [2.0**-12, 2.0**-10, 2.0**-6])
@pytest.mark.parametrize("alpha", [8.0, 16.0, 24.0, 40.0])
def test_bound_across_confidence_and_eps(eps, alpha):
    """From nothing skippable (alpha 8) to everything but the target tiles (alpha 40); ragged last block and
    tile (300 rows, 4000 entries)."""
    e, c, t, b = confident_inputs(300, 64, 4000, torch.float32, alpha=alpha, seed=int(alpha))
    check_bound(e, c, t, b, eps=eps)


def test_bound_on_random_inputs():
    for seed in range(3):
        torch.manual_seed(seed)
        for regime in ("flat", "peaked"):
            e, c, t, b = make_inputs((2, 150), 40, 1500, torch.float32, regime=regime, bias=True)
            check_bound(e, c, t, b, eps=2.0**-6, reduction="sum", shift=True)


@pytest.mark.parametrize(
    "options",
    [
        dict(softcap=20.0),
        dict(softcap=30.0, shift=True),
        dict(label_smoothing=0.1),
        dict(label_smoothing=0.1, mode="speed", reduction="sum"),
        dict(reduction="none"),
        dict(reduction="none", return_lse=True),
        dict(shift=True, reduction="mean"),
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_bound_with_options(options):
    shift = options.get("shift", False)
    e, c, t, b = confident_inputs(2 * 150, 64, 4000, torch.float32, bias=True)
    if shift:
        e, t = e.detach().view(2, 150, 64).requires_grad_(), t.view(2, 150)
    counter, _, _ = check_bound(e, c, t, b, eps=2.0**-8, **options)
    assert counter.tiles_skipped > 0


def test_bound_under_autocast():
    """fp32 leaves, bf16 autocast: the bound holds for the bf16 values the op computes with."""
    e, c, t, b = confident_inputs(300, 64, 4000, torch.float32, bias=True)
    counter, _, _ = check_bound(e, c, t, b, eps=2.0**-8, autocast=torch.bfloat16)
    assert counter.tiles_skipped > 0


def test_flat_rows_are_grouped_apart_from_confident_ones():
    """One flat row would make a whole block unskippable (the block bound is a max over rows); the rows are
    grouped by confidence first, so flat rows interleaved with confident ones (every third row) fill a block of
    their own: it skips nothing and their gradients are exact; the confident blocks skip."""
    flat = torch.zeros(384, dtype=torch.bool)
    flat[::3] = True
    e, c, t, b = confident_inputs(384, 64, 4000, torch.float32, flat_rows=flat, ignore_frac=0.0)
    counter, got, exact = check_bound(e, c, t, b, eps=2.0**-8)
    assert 0 < counter.tiles_skipped <= 2 * 16  # only the two confident blocks skip
    assert torch.equal(got[0][flat], exact[0][flat])
    assert not torch.equal(got[0][~flat], exact[0][~flat])


def test_ignored_rows_get_no_gradient_and_empty_blocks_skip():
    e, c, t, b = confident_inputs(300, 64, 4000, torch.float32, ignore_frac=0.0)
    t[128:256] = -100  # block 1 counts no row: all its tiles are skipped (zero bound), its gradient is 0
    counter, got, _ = check_bound(e, c, t, b, eps=2.0**-8)
    assert torch.count_nonzero(got[0][128:256]) == 0
    assert counter.tiles_skipped >= 16


# ------------------------------------------------------------------------------------------------ what is skipped


def _skip_fraction(e, c, t, eps: float, vocab_order: str = "natural") -> float:
    counter = FilterCounter()
    _grads(e, c, t, None, torch.tensor(1.0), filter_eps=eps, filter_counter=counter, filter_vocab_order=vocab_order)
    return counter.skipped_fraction


def test_sorting_clusters_skippable_tiles():
    """On LM-like logits nothing is skippable in the drawn order; with rows by entropy (the bench) and the
    vocabulary by mean logit (the op's default order) most tiles are (measured 72% at N=512, D=128, V=8192,
    eps=2^-10), and flat logits skip nothing in either order."""
    e, c, t = regime_inputs("lm", 512, 128, 8192, device="cpu", dtype=torch.float32)
    natural = _skip_fraction(e, c, t, 2.0**-10)  # rows grouped by the op, the vocabulary as drawn
    assert natural < 0.4
    assert _skip_fraction(*sorted_problem(e, c, t), 2.0**-10, "mean_logit") > max(0.6, natural + 0.2)
    e, c, t = regime_inputs("flat", 512, 128, 8192, device="cpu", dtype=torch.float32)
    assert _skip_fraction(*sorted_problem(e, c, t), 2.0**-10, "mean_logit") == 0.0


def _independent_decision(e, c, t, eps: float, bias=None) -> tuple[int, int, float]:
    """The rule written out again, in fp64 and plain Python: (pairs seen, skipped, max dropped row mass). Rows
    are put in confidence order first (ignored rows, then increasing entropy of the tile masses)."""
    z = e.double() @ c.double().T + (bias.double() if bias is not None else 0.0)
    p = torch.softmax(z, -1)
    valid = t != -100
    p[~valid] = 0.0
    n, v = p.shape
    tiles = math.ceil(v / BV)
    mass = torch.stack([p[:, k * BV:(k + 1) * BV].sum(1) for k in range(tiles)], 1)  # (n, T)
    entropy = [-sum(float(m) * math.log(float(m)) for m in row if m > 0) for row in mass]
    order = sorted(range(n), key=lambda i: (-1.0 if not valid[i] else entropy[i], i))
    mass, t, valid = mass[order], t[order], valid[order]
    seen = skipped = 0
    worst = 0.0
    for start in range(0, n, BM):
        rows = range(start, min(n, start + BM))
        bound = mass[start:start + BM].max(0).values.tolist()
        protected = {int(t[i]) // BV for i in rows if valid[i]}
        total, skip = 0.0, []
        for k in sorted((k for k in range(tiles) if k not in protected), key=lambda k: (bound[k], k)):
            if total + bound[k] > eps * BUDGET_FACTOR:
                break
            total += bound[k]
            skip.append(k)
        seen += tiles
        skipped += len(skip)
        if skip:
            worst = max(worst, float(mass[start:start + BM][:, skip].sum(1).max()))
    return seen, skipped, worst


@pytest.mark.parametrize("alpha,eps,wrong", [(16.0, 2.0**-8, False), (24.0, 2.0**-12, False), (40.0, 2.0**-10, False),
                                             (40.0, 2.0**-10, True)])
def test_counter_matches_an_independent_count(alpha, eps, wrong):
    """``wrong``: confident rows whose targets sit in far tiles of negligible mass (a confidently wrong model):
    only the protection of target tiles keeps those tiles."""
    e, c, t, b = confident_inputs(300, 64, 4000, torch.float32, alpha=alpha, bias=True)
    if wrong:
        t = torch.where(t >= 0, (t + 2000) % 4000, t)
        check_bound(e, c, t, b, eps=eps)
    counter = FilterCounter()
    _grads(e, c, t, b, torch.tensor(1.0), filter_eps=eps, filter_counter=counter)
    seen, skipped, worst = _independent_decision(e.detach(), c.detach(), t, eps, b.detach())
    stats = counter.stats()
    assert (stats.tiles_seen, stats.tiles_skipped) == (seen, skipped)
    assert stats.max_row_dropped_mass == pytest.approx(worst, rel=1e-4, abs=1e-12)
    assert counter.drain() == stats and counter.tiles_seen == 0  # drained


def test_counter_accumulates_over_calls_and_modes():
    e, c, t, b = confident_inputs(300, 64, 4000, torch.float32)
    counter = FilterCounter()
    for mode in ("memory", "speed"):
        _grads(e, c, t, b, torch.tensor(1.0), filter_eps=2.0**-8, filter_counter=counter, mode=mode)
    one = FilterCounter()
    _grads(e, c, t, b, torch.tensor(1.0), filter_eps=2.0**-8, filter_counter=one)
    assert counter.tiles_seen == 2 * one.tiles_seen and counter.tiles_skipped == 2 * one.tiles_skipped > 0


# ------------------------------------------------------------------------------------------------ refusals, routing


@pytest.mark.parametrize("eps", [0, 0.0, 1.0, 1, -0.1, 2.0, math.nan, math.inf, True, "0.01", torch.tensor(0.01)])
def test_bad_eps_is_refused_before_any_work(eps):
    e, c, t, _ = make_inputs((5,), 8, 11, torch.float32)
    t[0] = 11  # out of range: the target check would raise a different error, later
    with pytest.raises(ValueError, match="filter_eps must be"):
        linear_cross_entropy(e, c, t, filter_eps=eps)
    with pytest.raises(ValueError, match="filter_eps must be"):
        CCEConfig(filter_eps=eps)


def test_refusals():
    e, c, t, _ = make_inputs((5,), 8, 11, torch.float32)
    with pytest.raises(ValueError, match="needs filter_eps"):
        linear_cross_entropy(e, c, t, filter_counter=FilterCounter())
    with pytest.raises(TypeError, match="filter_counter"):
        linear_cross_entropy(e, c, t, filter_eps=0.01, filter_counter={})
    with pytest.raises(ValueError, match="softcap with label_smoothing"):
        linear_cross_entropy(e, c, t, filter_eps=0.01, softcap=5.0, label_smoothing=0.1)
    with pytest.raises(ValueError, match="impl='triton' cannot filter this call \\(fp16 inputs\\)"):
        linear_cross_entropy(e.half(), c.half(), t, filter_eps=0.01, impl="triton", mode="memory")
    assert CCEConfig(filter_eps=0.01, impl="triton", mode="memory").filter_eps == 0.01  # both modes filter there


def test_compile_is_refused(monkeypatch):
    e, c, t, _ = make_inputs((5,), 8, 11, torch.float32)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(ValueError, match="torch.compile"):
        linear_cross_entropy(e, c, t, filter_eps=0.01)


def test_auto_takes_the_torch_path_where_triton_cannot_filter(monkeypatch):
    """On CUDA, where auto would take Triton, a filtered call takes it in either mode for bf16/fp32 inputs
    (``tests/test_filter_triton.py``, ``tests/test_memory_filter_triton.py``), the torch path (and a warning) for
    fp16; ``mode="speed"`` where speed mode cannot run the call is refused with impl='triton'."""
    monkeypatch.setattr(backends, "_triton_available", lambda: True)
    cuda = torch.device("cuda")
    assert resolve_impl("auto", cuda, torch.bfloat16) == "triton"
    assert resolve_impl("auto", cuda, torch.bfloat16, filtered=True) == "triton"
    assert resolve_impl("auto", cuda, torch.bfloat16, filtered=True, mode="memory") == "triton"
    with pytest.warns(UserWarning, match="fp16 inputs"):
        assert resolve_impl("auto", cuda, torch.float16, filtered=True, mode="memory") == "torch"
    assert resolve_impl("auto", torch.device("cpu"), torch.bfloat16, filtered=True) == "torch"
    assert resolve_impl("torch", cuda, torch.bfloat16, filtered=True) == "torch"
    with pytest.raises(ValueError, match="impl='triton' cannot filter this call"):
        resolve_impl("triton", cuda, torch.bfloat16, filtered=True, mode="speed", reduction="none")


def test_config_passes_the_filter_and_owns_the_counter():
    config = CCEConfig(filter_eps=2.0**-8)
    options = config.op_options(torch.float32, None)
    assert options["filter_eps"] == 2.0**-8 and options["filter_counter"] is config.filter_counter
    e, c, t, b = confident_inputs(300, 64, 4000, torch.float32)
    linear_cross_entropy(e, c, t, impl="torch", **{k: v for k, v in options.items() if k != "impl"}).backward()
    assert config.filter_counter.tiles_skipped > 0
    assert CCEConfig().filter_counter is None and "filter_eps" not in CCEConfig().op_options(torch.float32, None)
    smoothed = CCEConfig(filter_eps=2.0**-8, label_smoothing=0.1)
    assert "filter_eps" not in smoothed.op_options(torch.float32, 30.0)  # exact there (one warning)
