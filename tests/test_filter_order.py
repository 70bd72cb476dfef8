"""The vocabulary order of a filtered call (``filter_vocab_order``, ``cce_patch/ops/filter_order.py``): the
permutation and its backward, the order itself, exactness when nothing is skipped, the proven bound with the
order on, what the order buys on LM-like logits, the option's validation and its way from CCEConfig."""

from __future__ import annotations

import copy

import pytest
import torch
from models_tiny import batch, tiny_model
from oracle import TOL, dense_reference, make_inputs, rel_err
from test_ops_filter import confident_inputs

from cce_patch import CCEConfig, linear_cross_entropy, patch
from cce_patch.bench.filter_stats import sorted_problem
from cce_patch.bench.regimes import make_inputs as regime_inputs
from cce_patch.models import config_of
from cce_patch.ops.filter_order import (
    PermuteRows,
    inverse_permutation,
    mean_logit_order,
    mean_logit_scores,
    rename_targets,
    vocabulary_order,
)
from cce_patch.ops.filtering import FilterCounter
from cce_patch.ops.second_order import DoubleBackwardError
from cce_patch.ops.spec import LossSpec, effective_targets

# ------------------------------------------------------------------------------------------------ the pieces


def test_permute_rows_backward_is_the_inverse_gather():
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(9, generator=gen)
    new_id = inverse_permutation(order)
    assert torch.equal(order[new_id], torch.arange(9)) and torch.equal(new_id[order], torch.arange(9))
    for shape in ((9, 4), (9,)):
        x = torch.randn(shape, dtype=torch.float64, generator=gen, requires_grad=True)
        y = PermuteRows.apply(x, order, new_id)
        assert torch.equal(y, x[order])
        up = torch.randn(shape, dtype=torch.float64, generator=gen)
        (grad,) = torch.autograd.grad(y, x, up)
        assert torch.equal(grad, up[new_id])  # explicit: row order[k] of x receives row k of the upstream
        assert torch.equal(grad, torch.autograd.grad(x[order], x, up)[0])  # what indexing's own backward gives
        assert torch.autograd.gradcheck(lambda t: PermuteRows.apply(t, order, new_id), (x,))
        assert torch.autograd.gradgradcheck(lambda t: PermuteRows.apply(t, order, new_id), (x,))


def test_order_is_decreasing_mean_logit_over_counted_rows():
    gen = torch.Generator().manual_seed(1)
    e, c, b = torch.randn(40, 6, generator=gen), torch.randn(300, 6, generator=gen), torch.randn(300, generator=gen)
    valid = torch.rand(40, generator=gen) < 0.6
    ref = c.double() @ e[valid].double().mean(0) + b.double()  # fp64, the counted rows only
    scores = mean_logit_scores(e, c, b, valid)
    assert scores.dtype == torch.float32 and torch.allclose(scores.double(), ref, rtol=1e-5, atol=1e-5)
    half = mean_logit_scores(e.bfloat16(), c.bfloat16(), b, valid)  # bf16 GEMVs: an order, not exact values
    assert half.dtype == torch.float32 and torch.allclose(half.double(), ref, rtol=0.05, atol=0.05)
    order = mean_logit_order(e, c, b, valid)
    assert torch.equal(order.sort().values, torch.arange(300))
    assert torch.all(ref[order][:-1] >= ref[order][1:] - 1e-5)
    kept = mean_logit_order(e, c, b, valid, keep=17)
    assert kept[17] == 17 and torch.equal(kept[kept != 17], order[order != 17])  # the rest in the same order
    nobody = mean_logit_scores(e, c, b, torch.zeros(40, dtype=torch.bool))
    assert torch.equal(nobody, b)  # all rows ignored: the bias orders alone, no NaN


def test_the_calls_targets_come_first():
    """The counted targets' entries lead (their tiles are protected anyway), each group by mean logit; the
    targets of rows that do not count are not promoted."""
    gen = torch.Generator().manual_seed(3)
    e, c = torch.randn(40, 6, generator=gen), torch.randn(300, 6, generator=gen)
    targets = torch.randint(0, 300, (40,), generator=gen)
    valid = torch.rand(40, generator=gen) < 0.6
    order = mean_logit_order(e, c, None, valid, targets=targets)
    assert torch.equal(order.sort().values, torch.arange(300))
    lead = set(targets[valid].tolist())
    assert set(order[: len(lead)].tolist()) == lead
    scores = mean_logit_scores(e, c, None, valid)
    for group in (order[: len(lead)], order[len(lead):]):
        assert torch.all(scores[group][:-1] >= scores[group][1:])
    spec = LossSpec(ignore_index=-100, shift_period=0)
    t = torch.where(valid, targets, -100)
    assert torch.equal(vocabulary_order(e, c, None, t, spec), order)


def test_rename_targets_keeps_what_is_not_a_class():
    new_id = torch.tensor([2, 0, 3, 1])
    t = torch.tensor([0, 1, 2, 3, -100, 7, -1], dtype=torch.int32)
    out = rename_targets(t, new_id, -100)
    assert out.dtype == torch.int32 and out.tolist() == [2, 0, 3, 1, -100, 7, -1]
    assert rename_targets(torch.tensor([0, 1, 2, 3]), torch.tensor([1, 0, 2, 3]), 2).tolist() == [1, 0, 2, 3]


# ------------------------------------------------------------------------------------------------ nothing skipped

OPTIONS = [
    dict(),
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(shift=True),
    dict(ignore_index=5),
    dict(label_smoothing=0.1),
    dict(softcap=3.0, shift=True),
    dict(reduction="none", return_lse=True),
    dict(mode="speed", reduction="sum"),
    dict(bias=False),
]


def _run(e, c, t, b, upstream, lse_upstream, **kw):
    """Loss, LSE and gradients of ``(loss * upstream).sum() (+ (lse * lse_upstream).sum())`` on fresh leaves."""
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in (e, c, b)]
    out = linear_cross_entropy(leaves[0], leaves[1], t, bias=leaves[2], impl="torch", **kw)
    loss, lse = out if kw.get("return_lse") else (out, None)
    objective = (loss * upstream).sum() + ((lse * lse_upstream).sum() if lse is not None else 0.0)
    objective.backward()
    return [loss.detach(), None if lse is None else lse.detach()], [x.grad if x is not None else None for x in leaves]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "mean")
def test_nothing_skipped_is_the_exact_call(options):
    """filter_eps tiny (nothing skipped): the reordered call is the exact op on the permuted problem bit for bit
    (renaming and undoing are exact), equals the exact call in the given order up to fp32 summation order, and
    the fp64 oracle to fp32 rounding."""
    options = dict(options)
    with_bias, shift = options.pop("bias", True), options.get("shift", False)
    ignore_index = options.get("ignore_index", -100)
    torch.manual_seed(0)
    e, c, t, b = make_inputs((2, 150), 32, 700, torch.float32, bias=with_bias)
    if ignore_index != -100:
        t = torch.where(t == -100, ignore_index, t)
    gen = torch.Generator().manual_seed(2)
    scalar = options.get("reduction", "mean") != "none"
    upstream = torch.tensor(1.3) if scalar else torch.randn(t.shape, generator=gen)
    lse_upstream = torch.randn(t.shape, generator=gen)

    counter = FilterCounter()
    got_out, got = _run(e, c, t, b, upstream, lse_upstream, filter_eps=1e-30, filter_counter=counter,
                        filter_vocab_order="mean_logit", **options)  # explicit: "auto" keeps memory mode's order
    assert counter.tiles_seen > 0 and counter.tiles_skipped == 0

    # the exact op on the problem permuted by hand, gradients of c and bias gathered back
    spec = LossSpec(ignore_index=ignore_index, shift_period=t.shape[-1] if shift else 0)
    order = vocabulary_order(e.detach().reshape(-1, 32), c.detach(), b.detach() if b is not None else None,
                             t.reshape(-1), spec)
    assert not torch.equal(order, torch.arange(700))  # the order really permutes
    new_id = inverse_permutation(order)
    t_p = rename_targets(t, new_id, ignore_index)
    by_hand_out, by_hand = _run(e, c.detach()[order], t_p, b.detach()[order] if b is not None else None, upstream,
                                lse_upstream, **options)
    by_hand = [by_hand[0], by_hand[1][new_id], by_hand[2][new_id] if b is not None else None]
    for x, y in zip(got_out + got, by_hand_out + by_hand, strict=True):
        assert (x is None and y is None) or torch.equal(x, y)

    exact_out, exact = _run(e, c, t, b, upstream, lse_upstream, **options)
    for x, y in zip(got_out + got, exact_out + exact, strict=True):
        if x is not None:
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)

    kw = {k: v for k, v in options.items() if k != "mode"}
    ref, ref_lse, leaves = dense_reference(e, c, t, bias=b, **kw)
    objective = (ref * upstream.double()).sum()
    if options.get("return_lse"):
        objective = objective + (ref_lse * lse_upstream.double()).sum()
    objective.backward()
    assert rel_err(got_out[0], ref) < TOL[torch.float32]
    for x, leaf in zip(got, leaves, strict=True):
        if leaf is not None:
            assert rel_err(x, leaf.grad) < TOL[torch.float32]


# ------------------------------------------------------------------------------------------------ the bound


def lm_inputs(bias: bool):
    """LM-like logits (``regimes.py``'s ``lm``: a Zipf-like head of frequent entries spread over the ids, rows of
    varied confidence) with rows grouped by confidence (the bench's entropy order, as the Triton path's row
    grouping will do), N=512, D=64, V=4096, and a small random bias: fresh leaves."""
    e, c, t = sorted_problem(*regime_inputs("lm", 512, 64, 4096, device="cpu", dtype=torch.float32))
    b = 0.1 * torch.randn(4096, generator=torch.Generator().manual_seed(5)) if bias else None
    return (e.detach().requires_grad_(), c.detach().requires_grad_(), t,
            b.requires_grad_() if b is not None else None)


def _skips(e, c, t, b, eps: float, how: str, **kw) -> float:
    counter = FilterCounter()
    _run(e, c, t, b, torch.tensor(1.0), None, filter_eps=eps, filter_counter=counter, filter_vocab_order=how, **kw)
    return counter.skipped_fraction


@pytest.mark.parametrize("options", [dict(), dict(reduction="sum"), dict(reduction="none"), dict(softcap=20.0),
                                     dict(label_smoothing=0.1, shift=True), dict(mode="speed")],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "mean")
def test_bound_holds_with_the_order(options):
    """Against the fp64 oracle on fresh inputs: the loss is exact (to fp32 rounding), each row of dE within
    w_i * eps * max||c_v||, dC within eps * sum_i w_i ||e_i|| (Frobenius), dbias within eps * sum_i w_i (L1)
    (filtering.py's bounds), plus the exact op's own rounding; and the order makes the filter skip here."""
    eps, shift = 2.0**-8, options.get("shift", False)
    e, c, t, b = lm_inputs(bias=True)
    if shift:
        e, t = e.detach().view(4, 128, 64).requires_grad_(), t.view(4, 128)
    reduction = options.get("reduction", "mean")
    gen = torch.Generator().manual_seed(4)
    upstream = torch.tensor(1.7) if reduction != "none" else torch.randn(t.shape, generator=gen)

    counter = FilterCounter()
    (loss, _), got = _run(e, c, t, b, upstream, None, filter_eps=eps, filter_counter=counter,
                          filter_vocab_order="mean_logit", **options)  # explicit: memory mode's "auto" is natural
    assert counter.skipped_fraction > 0.4 and 0 < counter.max_row_dropped_mass <= eps  # it filters, within eps

    kw = {k: v for k, v in options.items() if k != "mode"}
    ref, _, (e64, c64, b64) = dense_reference(e, c, t, bias=b, **kw)
    (ref * upstream.double()).sum().backward()
    assert rel_err(loss, ref) < TOL[torch.float32]

    valid = effective_targets(t.reshape(-1), LossSpec(shift_period=t.shape[-1] if shift else 0)) != -100
    n_valid = int(valid.sum())
    g = upstream.double().reshape(-1) / (n_valid if reduction == "mean" else 1)
    w = g.abs() * valid.double()  # (N,), or a broadcast scalar times the mask
    rt = 1e-4  # the exact op's own fp32 rounding, relative to each compared gradient
    de, de_ref = got[0].double().reshape(-1, 64), e64.grad.reshape(-1, 64)
    row_err = (de - de_ref).norm(dim=1)
    row_bound = w * eps * c.detach().double().norm(dim=1).max()
    row_tol = rt * (de_ref.norm(dim=1) + de.norm(dim=1)) + rt * 1e-3 * de_ref.norm(dim=1).max()
    assert torch.all(row_err <= row_bound + row_tol), float(((row_err - row_tol) / row_bound).max())
    dc_err = (got[1].double() - c64.grad).norm()
    assert dc_err <= eps * (w * e.detach().double().reshape(-1, 64).norm(dim=1)).sum() + rt * c64.grad.norm()
    db_err = (got[2].double() - b64.grad).abs().sum()
    assert db_err <= eps * w.sum() + rt * b64.grad.abs().sum()


def test_lm_logits_skip_clearly_more_with_the_order():
    """LM-like logits with rows grouped by confidence (the bench's entropy order): measured 23% of tiles skipped
    in the natural vocabulary order, 64% in the mean-logit order (N=512, D=64, V=4096, eps=2^-10)."""
    e, c, t, _ = lm_inputs(bias=False)
    natural, ordered = _skips(e, c, t, None, 2.0**-10, "natural"), _skips(e, c, t, None, 2.0**-10, "mean_logit")
    assert ordered > natural + 0.25, (natural, ordered)


def test_double_backward_through_the_order_is_refused():
    e, c, t, _ = confident_inputs(300, 64, 4000, torch.float32)
    loss = linear_cross_entropy(e, c, t, impl="torch", filter_eps=2.0**-8)
    (dc,) = torch.autograd.grad(loss, c, create_graph=True)
    with pytest.raises(DoubleBackwardError):
        dc.sum().backward()


# ------------------------------------------------------------------------------------------------ the option


@pytest.mark.parametrize("value", ["sorted", "", None, 1, "MEAN_LOGIT"])
def test_bad_values_are_refused_before_any_work(value):
    e, c, t, _ = make_inputs((5,), 8, 11, torch.float32)
    t[0] = 11  # out of range: the target check would raise a different error, later
    with pytest.raises(ValueError, match="filter_vocab_order must be one of"):
        linear_cross_entropy(e, c, t, filter_eps=0.01, filter_vocab_order=value)
    with pytest.raises(ValueError, match="CCEConfig.filter_vocab_order must be one of"):
        CCEConfig(filter_eps=0.01, filter_vocab_order=value)


def test_a_non_default_order_needs_the_filter():
    e, c, t, _ = make_inputs((5,), 8, 11, torch.float32)
    with pytest.raises(ValueError, match="needs filter_eps"):
        linear_cross_entropy(e, c, t, filter_vocab_order="natural")
    with pytest.raises(ValueError, match="needs filter_eps"):
        CCEConfig(filter_vocab_order="natural")
    with pytest.raises(ValueError, match="needs filter_eps"):
        linear_cross_entropy(e, c, t, filter_vocab_order="mean_logit")
    exact = linear_cross_entropy(e, c, t)  # the default without the filter: nothing reordered, nothing refused
    assert torch.equal(linear_cross_entropy(e, c, t, filter_vocab_order="auto"), exact)


def test_auto_order_is_the_modes_own():
    """"auto" orders by mean logit in speed mode and keeps the given order in memory mode, whose autograd node
    would hold the ordered copy of c until its backward: a natural-order call gives the same gradients."""
    from cce_patch.ops.filter_order import resolve_vocab_order

    assert resolve_vocab_order("auto", speed=True) == "mean_logit"
    assert resolve_vocab_order("auto", speed=False) == "natural"
    assert resolve_vocab_order("natural", speed=True) == "natural"
    e, c, t, _ = lm_inputs(bias=False)
    grads = {}
    for how in ("auto", "natural", "mean_logit"):
        leaves = [x.detach().clone().requires_grad_() for x in (e, c)]
        counter = FilterCounter()
        linear_cross_entropy(*leaves, t, mode="memory", filter_eps=2.0**-8, filter_counter=counter,
                             filter_vocab_order=how).backward()
        grads[how] = (leaves[0].grad, leaves[1].grad, counter.skipped_fraction)
    assert all(torch.equal(x, y) for x, y in zip(grads["auto"][:2], grads["natural"][:2], strict=True))
    assert grads["mean_logit"][2] > grads["natural"][2]  # the explicit order still reorders in memory mode


def test_config_passes_the_order_to_the_op():
    e, c, t, _ = lm_inputs(bias=False)
    fractions = {}
    for how in ("natural", "mean_logit"):
        config = CCEConfig(filter_eps=2.0**-8, filter_vocab_order=how)
        options = config.op_options(torch.float32, None)
        assert options["filter_vocab_order"] == how
        linear_cross_entropy(e, c, t, impl="torch", **{k: v for k, v in options.items() if k != "impl"}).backward()
        fractions[how] = config.filter_counter.skipped_fraction
    assert fractions["mean_logit"] > fractions["natural"] + 0.25
    assert "filter_vocab_order" not in CCEConfig().op_options(torch.float32, None)
    assert CCEConfig.from_dict({"filter_eps": 0.01, "filter_vocab_order": "natural"}).filter_vocab_order == "natural"


def test_patched_model_with_the_order_matches_stock():
    """Through the interception (shift, a masked prompt, padding): nothing skipped, the reordered loss and every
    gradient are the stock model's."""
    stock = tiny_model("llama").train()
    assert config_of(patch(copy.deepcopy(stock), impl="torch", filter_eps=1e-30)).filter_vocab_order == "auto"
    patched = patch(copy.deepcopy(stock), impl="torch", filter_eps=1e-30, filter_vocab_order="mean_logit")
    assert config_of(patched).filter_vocab_order == "mean_logit"
    ids, mask, labels = batch()
    results = []
    for model in (patched, stock):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for name, grad in results[1][1].items():
        torch.testing.assert_close(results[0][1][name], grad, rtol=1e-5, atol=1e-6, msg=name)
