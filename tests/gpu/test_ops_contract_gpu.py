"""The op's contract on CUDA (issue 12): autocast precision and the compiled path with the Triton backend.

The CPU suite (tests/test_ops_contract.py) covers the same contract with the torch path and the Triton
interpreter; this file checks what only a GPU shows: CUDA autocast with the compiled Triton kernels and
cuBLAS, ``impl="auto"`` picking Triton for an fp32 model under autocast, and inductor compiling a training
step around our custom ops.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from oracle import TOL, dense_reference, make_inputs, rel_err

from cce_patch import linear_cross_entropy
from cce_patch.ops import resolve_impl
from cce_patch.ops.autocast import compute_dtype

pytestmark = pytest.mark.gpu


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]


@pytest.mark.parametrize("impl", ["auto", "triton", "torch"])
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("inputs", ["fp32", "half-hidden"])
@pytest.mark.parametrize("mode", ["memory", "speed"])
def test_cuda_autocast_matches_stock_precision(impl, amp, inputs, mode):
    """Under CUDA autocast the op computes from the inputs autocast gives F.linear, in fp32: loss error against
    the fp64 loss of those inputs at most stock's (autocast F.linear + fp32 cross-entropy), gradients within 2.5x
    of stock's. An fp32 model under autocast takes the Triton kernels with impl="auto", as stock takes bf16
    GEMMs."""
    if mode == "speed" and amp == torch.float16:
        pytest.skip("speed mode refuses fp16 (tests/test_ops_speed.py)")
    e, c, t, _ = make_inputs((4, 512), 256, 32000, torch.float32, device="cuda")
    e, c = _leaves(e.to(amp if inputs == "half-hidden" else torch.float32), c)
    with torch.autocast("cuda", dtype=amp):
        assert compute_dtype(e, c) == amp
        if impl == "auto":
            assert resolve_impl("auto", e.device, compute_dtype(e, c)) == "triton"
        loss = linear_cross_entropy(e, c, t, shift=True, impl=impl, mode=mode)
        logits = F.linear(e, c).float()
        stock = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), t[:, 1:].reshape(-1))
    ref, _, (e64, c64, _) = dense_reference(e.to(amp), c.to(amp), t, shift=True)
    ref.backward()
    stock_grads = torch.autograd.grad(stock, (e, c))
    loss.backward()
    loss_err, stock_err = rel_err(loss, ref), rel_err(stock, ref)
    assert loss.dtype == torch.float32
    assert loss_err < TOL[torch.float32] and loss_err <= max(stock_err, 1e-6), (loss_err, stock_err)
    for x, want, stock_grad in zip((e, c), (e64, c64), stock_grads, strict=True):
        assert x.grad.dtype == x.dtype
        err, stock_grad_err = rel_err(x.grad, want.grad), rel_err(stock_grad, want.grad)
        assert err < TOL[amp] and err <= 2.5 * stock_grad_err, (err, stock_grad_err)


def test_cpu_call_under_cuda_autocast_is_unchanged():
    """Autocast applies per device type: CUDA autocast leaves a CPU call alone, as it leaves CPU F.linear."""
    e, c, t, _ = make_inputs((7,), 16, 50, torch.float32)
    plain = linear_cross_entropy(e, c, t, impl="torch")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        torch.testing.assert_close(linear_cross_entropy(e, c, t, impl="torch"), plain, rtol=0, atol=0)


CASES = {"plain": {}, "shift-softcap-bias": {"shift": True, "softcap": 30.0, "bias": True}}


@pytest.mark.parametrize("mode", ["memory", "speed"])
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_compiled_triton_matches_eager(mode, case):
    """inductor, fullgraph=True, bf16, impl="triton": the compiled loss and gradients are eager's (the same
    kernels run inside the custom ops), with no graph break. Speed mode's gradients may differ by one bf16
    rounding (H200: 2 of 16.4M elements): eager scales its stored bf16 gradients by the upstream 0.37 in place,
    the compiled graph where inductor puts the multiply."""
    torch._dynamo.reset()
    kw = dict(CASES[case])
    e, c, t, b = make_inputs((2, 1024), 512, 32000, torch.bfloat16, bias=kw.pop("bias", False), device="cuda")

    def fn(e, c, t, b):
        return linear_cross_entropy(e, c, t, bias=b, impl="triton", mode=mode, **kw)

    explained = torch._dynamo.explain(fn)(e, c, t, b)
    assert explained.graph_break_count == 0, [str(r.reason)[:400] for r in explained.break_reasons]
    results = []
    for run in (fn, torch.compile(fn, fullgraph=True)):
        leaves = _leaves(e, c, b)
        loss = run(leaves[0], leaves[1], t, leaves[2])
        (loss * 0.37).backward()
        results.append([loss.detach(), *(x.grad.float() for x in leaves if x is not None)])
    for k, (got, want) in enumerate(zip(*reversed(results), strict=True)):
        one_rounding = mode == "speed" and k > 0
        torch.testing.assert_close(got, want, rtol=2**-7 if one_rounding else 1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["memory", "speed"])
def test_cuda_compiled_training_step_under_autocast(mode):
    """A small model's training step under bf16 autocast, compiled whole (inductor, fullgraph) with our loss
    in its graph, tracks eager over a few AdamW steps (the rest of the model is inductor's, so bf16-sized
    differences are expected there)."""
    torch._dynamo.reset()

    class TinyLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(32000, 256)
            self.mix = torch.nn.Linear(256, 256)
            self.head = torch.nn.Linear(256, 32000, bias=False)

        def forward(self, ids):
            h = F.gelu(self.mix(self.embed(ids)))
            return linear_cross_entropy(h, self.head.weight, ids, shift=True, softcap=30.0, mode=mode)

    eager = TinyLM().cuda()
    compiled = TinyLM().cuda()
    compiled.load_state_dict(eager.state_dict())
    step = torch.compile(compiled, fullgraph=True)
    ids = torch.randint(0, 32000, (4, 256), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(compiled)(ids)
    assert explained.graph_break_count == 0, [str(r.reason)[:400] for r in explained.break_reasons]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (eager, compiled)]
    losses = []
    for _ in range(3):
        ids = torch.randint(0, 32000, (4, 256), device="cuda")
        pair = []
        for model, opt in zip((eager, step), opts, strict=True):
            opt.zero_grad()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(ids)
            loss.backward()
            opt.step()
            pair.append(float(loss))
        losses.append(pair)
    for want, got in losses:
        assert abs(got - want) < 1e-2 * abs(want), losses


def test_cuda_compiled_reduce_overhead_runs_the_op_outside_cuda_graphs():
    """mode="reduce-overhead" (CUDA graphs): the forward ops are tagged cudagraph_unsafe (they may sync with
    the host), so inductor keeps them out of the captured graph and the step still matches eager."""
    torch._dynamo.reset()
    e, c, t, _ = make_inputs((2, 256), 128, 5000, torch.bfloat16, device="cuda")
    fn = partial(linear_cross_entropy, impl="triton", shift=True)
    step = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    want = fn(e, c, t)
    for _ in range(3):
        got = step(e, c, t)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_cuda_compiled_bad_targets_raise():
    torch._dynamo.reset()
    e, c, t, _ = make_inputs((2, 64), 64, 1000, torch.bfloat16, device="cuda")
    fn = torch.compile(partial(linear_cross_entropy, impl="triton"), fullgraph=True)
    fn(e, c, t)
    t[1, 3] = 5000
    with pytest.raises(ValueError, match=r"outside \[0, 1000\)"):
        fn(e, c, t)
