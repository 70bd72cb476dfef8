"""``linear_log_probs`` against an fp64 oracle (explicit logits), on both backends: every field's value and the
gradients of log-probs and entropy, over bias, softcap, logit scale, temperature, shift, ignore_index, odd
shapes, dtypes, and the Triton kernel's loading/loop variants; the loss path's kernels with the new flags off
are covered by the existing suites (test_ops_triton.py, test_ops_torch.py)."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import HAS_CUDA, INTERPRETING
from oracle import TOL, rel_err

from cce_patch import linear_cross_entropy, linear_log_probs
from cce_patch.ops.stats import OUTPUTS

ALL = OUTPUTS
DEVICE = "cuda" if HAS_CUDA and not INTERPRETING else "cpu"
IMPLS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not (INTERPRETING or HAS_CUDA), reason="needs CUDA or TRITON_INTERPRET=1"))]


def stats_reference(e, c, t, *, bias=None, ignore_index=-100, softcap=None, logit_scale=1.0, temperature=1.0,
                    shift=False):
    """Every field of TokenStats from explicit fp64 logits, on fp64 leaf copies of e, c, bias (returned for
    their gradients)."""
    e64 = e.detach().double().requires_grad_(True)
    c64 = c.detach().double().requires_grad_(True)
    b64 = bias.detach().double().requires_grad_(True) if bias is not None else None
    y = e64 @ c64.T
    if b64 is not None:
        y = y + b64
    y = y * logit_scale
    if softcap is not None:
        y = softcap * torch.tanh(y / softcap)
    z = y / temperature
    tt = t.long()
    if shift:
        tt = torch.cat([tt[..., 1:], torch.full_like(tt[..., :1], ignore_index)], dim=-1)
    mask = tt != ignore_index
    safe = torch.where(mask, tt, 0)
    log_p = torch.log_softmax(z, dim=-1)
    zero = torch.zeros((), dtype=torch.float64)
    ref = {
        "log_probs": torch.where(mask, log_p.gather(-1, safe[..., None])[..., 0], zero),
        "entropy": torch.where(mask, -(log_p.exp() * log_p).sum(-1), zero),
        "log_sum_sq_probs": torch.where(mask, torch.logsumexp(2 * log_p, dim=-1), zero),
        "mean_logits": torch.where(mask, z.mean(-1), zero),
        "is_top1": mask & (z.argmax(-1) == safe),
        "mask": mask,
    }
    return ref, (e64, c64, b64)


def make(shape, d, v, dtype=torch.float32, bias=False, ignore_frac=0.2, scale=1.0):
    e = (torch.randn(*shape, d) / d**0.25).to(DEVICE)
    c = (scale * torch.randn(v, d) / d**0.25).to(DEVICE)
    t = torch.randint(0, v, shape).to(DEVICE)
    t[torch.rand(shape).to(DEVICE) < ignore_frac] = -100
    b = torch.randn(v).to(DEVICE) if bias else None
    e, c = e.to(dtype).requires_grad_(), c.to(dtype).requires_grad_()
    if b is not None:
        b = b.to(dtype).requires_grad_()
    return e, c, t, b


def check(impl, e, c, t, b, tol, outputs=ALL, grad_lp=True, grad_ent=True, **kw):
    """Values of every requested field, then the gradients of w1 . log_probs + w2 . entropy (random weights)
    with respect to e, c and bias, against the fp64 oracle."""
    got = linear_log_probs(e, c, t, bias=b, outputs=outputs, impl=impl, **kw)
    ref, leaves = stats_reference(e, c, t, bias=b, **kw)
    assert torch.equal(got.mask.cpu(), ref["mask"].cpu())
    errors = {}
    for name in OUTPUTS:
        value = getattr(got, name)
        if name != "log_probs" and name not in outputs:
            assert value is None
            continue
        assert value.shape == t.shape
        if name == "is_top1":
            assert value.dtype == torch.bool
            mismatch = (value.cpu() != ref[name].cpu()).sum().item()
            assert mismatch == 0, f"is_top1 differs on {mismatch} rows"
            continue
        assert value.dtype == torch.float32
        errors[name] = rel_err(value.detach().cpu(), ref[name].detach().cpu())
    w_lp = torch.randn(t.shape, dtype=torch.float64)
    w_ent = torch.randn(t.shape, dtype=torch.float64)
    objective = 0.0
    ref_objective = 0.0
    if grad_lp:
        objective = objective + (got.log_probs.double().cpu() * w_lp).sum()
        ref_objective = ref_objective + (ref["log_probs"].cpu() * w_lp).sum()
    if grad_ent and "entropy" in outputs:
        objective = objective + (got.entropy.double().cpu() * w_ent).sum()
        ref_objective = ref_objective + (ref["entropy"].cpu() * w_ent).sum()
    if torch.is_tensor(objective):
        grads = torch.autograd.grad(objective, [x for x in (e, c, b) if x is not None])
        ref_grads = torch.autograd.grad(ref_objective, [x for x in leaves if x is not None])
        names = [n for n, x in zip(("e", "c", "bias"), (e, c, b), strict=True) if x is not None]
        for name, g, r in zip(names, grads, ref_grads, strict=True):
            assert g.shape == r.shape
            errors["d" + name] = rel_err(g.cpu(), r.cpu())
    assert all(err < tol for err in errors.values()), errors
    return errors


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shift,softcap", list(itertools.product([False, True], [None, 2.5])))
def test_every_field_and_gradient(impl, shift, softcap):
    e, c, t, b = make((3, 13), 40, 301, bias=True)
    check(impl, e, c, t, b, TOL[torch.float32], shift=shift, softcap=softcap)


@pytest.mark.parametrize("impl", IMPLS)
def test_scale_temperature_and_cap_compose_in_trl_order(impl):
    """softcap(scale * (e.c + b)) / temperature, with a cap that binds (peaked logits)."""
    e, c, t, b = make((37,), 67, 1003, bias=True, scale=4.0)
    check(impl, e, c, t, b, TOL[torch.float32], softcap=3.0, logit_scale=0.37, temperature=0.7)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [0.3, 2.0])
def test_temperature_without_cap(impl, temperature):
    e, c, t, _ = make((2, 19), 48, 257, scale=3.0)
    check(impl, e, c, t, None, TOL[torch.float32], temperature=temperature, shift=True)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("outputs,grad_lp,grad_ent", [
    (("log_probs",), True, False),
    (("entropy",), False, True),  # entropy's gradient alone (an entropy bonus without the log-prob term)
    (("entropy", "is_top1"), True, False),  # SFT: entropy and accuracy as metrics only
    (("mean_logits", "log_sum_sq_probs"), True, False),
])
def test_output_subsets(impl, outputs, grad_lp, grad_ent):
    e, c, t, b = make((29,), 32, 200, bias=True)
    check(impl, e, c, t, b, TOL[torch.float32], outputs=outputs, grad_lp=grad_lp, grad_ent=grad_ent, softcap=4.0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(impl, dtype):
    e, c, t, _ = make((2, 21), 48, 300, dtype=dtype)
    check(impl, e, c, t, None, TOL[dtype], temperature=0.9, shift=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_log_probs_equal_minus_the_loss(impl):
    """log_probs is exactly -linear_cross_entropy(reduction='none') at temperature 1: the same kernels."""
    e, c, t, b = make((4, 9), 24, 130, bias=True)
    lp = linear_log_probs(e, c, t, bias=b, shift=True, softcap=5.0, impl=impl).log_probs
    loss = linear_cross_entropy(e, c, t, bias=b, shift=True, softcap=5.0, reduction="none", impl=impl)
    torch.testing.assert_close(lp, -loss, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_is_top1_is_the_first_argmax(impl):
    """Exact ties (integer inputs, so every summation order gives the same logits; the tied columns sit in
    different vocabulary tiles and splits): a target tied with an earlier column is not the argmax, one tied
    only with a later column is (torch.argmax's rule, and TRL's)."""
    d, v = 16, 140
    c = torch.randint(-3, 4, (v, d)).float()
    c[5] = c[100] = 10.0
    c[20] = c[130] = -10.0
    e = torch.ones(4, d)
    e[1::2] = -1.0
    targets = torch.tensor([100, 20, 5, 130])
    out = linear_log_probs(e.to(DEVICE), c.to(DEVICE), targets.to(DEVICE), outputs=("is_top1",), impl=impl)
    assert out.is_top1.cpu().tolist() == [False, True, True, False]
    assert ((e @ c.T).argmax(-1) == targets).tolist() == [False, True, True, False]


@pytest.mark.parametrize("impl", IMPLS)
def test_all_ignored_rows(impl):
    e, c, t, _ = make((2, 7), 16, 100, ignore_frac=1.0)
    out = linear_log_probs(e, c, t, outputs=ALL, impl=impl)
    for name in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits"):
        assert torch.count_nonzero(getattr(out, name)) == 0
    assert not out.is_top1.any() and not out.mask.any()
    de, dc = torch.autograd.grad(out.log_probs.sum() + out.entropy.sum(), (e, c))
    assert torch.count_nonzero(de) == 0 and torch.count_nonzero(dc) == 0


def test_empty_input():
    e = torch.zeros(0, 8, requires_grad=True)
    c = torch.randn(20, 8, requires_grad=True)
    out = linear_log_probs(e, c, torch.zeros(0, dtype=torch.long), outputs=ALL, impl="torch")
    assert out.log_probs.shape == (0,) and out.is_top1.shape == (0,)
    (dc,) = torch.autograd.grad(out.log_probs.sum() + out.entropy.sum(), (c,), allow_unused=True)
    assert dc is None or torch.count_nonzero(dc) == 0


def test_entropy_metric_only_costs_no_backward_term(monkeypatch):
    """An entropy that receives no gradient does not reach the backend's backward (materialize_grads off)."""
    from cce_patch.ops import chunked_torch

    seen = {}
    real = chunked_torch.backward

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(chunked_torch, "backward", spy)
    from cce_patch.ops.backends import get_backend

    get_backend.cache_clear()
    try:
        e, c, t, _ = make((11,), 16, 90)
        out = linear_log_probs(e, c, t, outputs=("entropy",), impl="torch")
        out.log_probs.sum().backward()
        assert seen["grad_plogp"] is None
    finally:
        get_backend.cache_clear()


@pytest.mark.skipif(not (INTERPRETING or HAS_CUDA), reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("tma,flat,waves", [(True, True, 32), (True, False, 32), (False, False, 1)],
                         ids=["tma-flat-splits", "tma-nested-splits", "pointers-one-split"])
def test_triton_loading_and_loop_variants(tma, flat, waves, monkeypatch):
    """The statistics through both tile-loading paths and both forward loops, with several vocabulary splits
    (their partials merged on the host) and with one."""
    from cce_patch.ops.fused import lse_kernel, tiles

    monkeypatch.setattr(tiles, "USE_TMA", tma)
    monkeypatch.setattr(lse_kernel, "FWD_FLAT_LOOP", flat)
    monkeypatch.setattr(lse_kernel, "FWD_WAVES", waves)
    e, c, t, b = make((45,), 40, 700, bias=True, scale=3.0)
    check("triton", e, c, t, b, TOL[torch.float32], softcap=6.0, logit_scale=1.3, temperature=0.8)


@pytest.mark.skipif(not (INTERPRETING or HAS_CUDA), reason="needs CUDA or TRITON_INTERPRET=1")
def test_triton_backward_row_groups(monkeypatch):
    """The backward's (row group x vocabulary chunk) tiling with the entropy term and the factor alpha."""
    from cce_patch.ops.fused import memory_mode

    monkeypatch.setattr(memory_mode, "DS_CHUNK_BYTES", 32 * 64 * 4)  # 32-row groups of 64 columns
    e, c, t, b = make((3, 37), 24, 150, bias=True)
    check("triton", e, c, t, b, TOL[torch.float32], shift=True, softcap=3.0, temperature=1.7)


def test_under_autocast_inputs_cast_like_f_linear():
    """Inside autocast (bf16) fp32 e and c are cast to bf16 as F.linear's would be; the arithmetic stays fp32
    (the result equals the call on bf16 copies outside autocast)."""
    e, c, t, _ = make((2, 9), 32, 120)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        inside = linear_log_probs(e, c, t, outputs=("entropy",), impl="torch")
    outside = linear_log_probs(e.bfloat16(), c.bfloat16(), t, outputs=("entropy",), impl="torch")
    torch.testing.assert_close(inside.log_probs, outside.log_probs, rtol=0, atol=0)
    torch.testing.assert_close(inside.entropy, outside.entropy, rtol=0, atol=0)
    (de,) = torch.autograd.grad(inside.log_probs.sum(), (e,))
    assert de.dtype == torch.float32


@pytest.mark.parametrize("bad,match", [
    (dict(outputs=("log_probs", "perplexity")), "unknown output"),
    (dict(temperature=0.0), "temperature must be a positive finite"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(logit_scale=float("inf")), "logit_scale must be a finite"),
    (dict(softcap=-1.0), "softcap"),
    (dict(impl="cuda"), "impl"),
])
def test_bad_options_are_refused_before_any_launch(bad, match):
    e, c, t, _ = make((5,), 8, 20)
    with pytest.raises((ValueError, TypeError), match=match):
        linear_log_probs(e, c, t, **bad)


def test_bad_targets_and_shapes_are_refused():
    e, c, t, _ = make((5,), 8, 20)
    with pytest.raises(ValueError, match="outside"):
        linear_log_probs(e, c, torch.full((5,), 20, device=DEVICE))
    with pytest.raises(ValueError, match="hidden size"):
        linear_log_probs(e, torch.randn(20, 9, device=DEVICE), t)


def test_single_output_name_as_a_string():
    e, c, t, _ = make((5,), 8, 20)
    assert linear_log_probs(e, c, t, outputs="entropy").entropy is not None


def test_double_backward_is_refused():
    from cce_patch.ops import DoubleBackwardError

    e, c, t, _ = make((2, 5), 16, 40)
    out = linear_log_probs(e, c, t, outputs=("entropy",), impl="torch")
    (de,) = torch.autograd.grad(out.log_probs.sum() + out.entropy.sum(), (e,), create_graph=True)
    with pytest.raises(DoubleBackwardError):
        de.sum().backward()
