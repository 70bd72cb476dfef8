"""mode="auto", the default: which exact mode a call runs (ops/mode_choice.py), on CPU.

Free memory is mocked through ``mode_choice.free_memory_bytes``, the one function that reads it; which mode ran
is read from the loss's autograd node (speed mode returns its Function's output, memory mode a reduction of
per-row losses).
"""

from __future__ import annotations

import inspect
import logging
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import HAS_CUDA, INTERPRETING

from cce_patch import CCEConfig, linear_cross_entropy
from cce_patch.ops import api, mode_choice
from cce_patch.ops.backends import get_backend
from cce_patch.ops.options import MODES
from cce_patch.ops.speed_plan import plan_triton

DEVICE = "cuda" if HAS_CUDA and not INTERPRETING else "cpu"
HAS_TRITON_PATH = INTERPRETING or HAS_CUDA


@pytest.fixture(autouse=True)
def _fresh_choices():
    mode_choice.clear_choices()
    yield
    mode_choice.clear_choices()


@pytest.fixture
def free_memory(monkeypatch):
    """Set the free memory auto sees (bytes, or None for unknown); counts the reads."""
    state = SimpleNamespace(value=10**12, reads=0)

    def fake(device):
        state.reads += 1
        return state.value

    monkeypatch.setattr(mode_choice, "free_memory_bytes", fake)
    return state


def inputs(n=24, d=16, v=200, dtype=torch.float32, device=DEVICE):
    e = torch.randn(n, d, dtype=dtype, device=device, requires_grad=True)
    c = (torch.randn(v, d, dtype=dtype, device=device) * 0.1).requires_grad_()
    t = torch.randint(0, v, (n,), device=device)
    return e, c, t


def ran_speed(loss: torch.Tensor) -> bool:
    return type(loss.grad_fn).__name__.startswith("SpeedModeFunction")


def test_auto_is_the_default_of_the_op_and_the_config():
    assert "auto" in MODES
    assert inspect.signature(linear_cross_entropy).parameters["mode"].default == "auto"
    assert CCEConfig().mode == "auto"
    options = CCEConfig(speed_chunk_bytes=2**20).op_options(torch.float16, None)
    assert options["mode"] == "auto" and options["speed_chunk_bytes"] == 2**20  # the op decides, per call


def test_torch_path_takes_speed_mode_when_it_fits_and_the_gradients_are_exact(free_memory):
    e, c, t = inputs()
    loss = linear_cross_entropy(e, c, t, impl="torch")
    assert ran_speed(loss)
    de, dc = torch.autograd.grad(loss, (e, c))
    ref = linear_cross_entropy(e, c, t, impl="torch", mode="memory")
    assert not ran_speed(ref)
    de_ref, dc_ref = torch.autograd.grad(ref, (e, c))
    assert torch.allclose(loss, ref, rtol=1e-6) and torch.allclose(de, de_ref, atol=1e-7)
    assert torch.allclose(dc, dc_ref, atol=1e-7)


def test_memory_pressure_takes_memory_mode_at_the_fraction(free_memory):
    """Speed mode iff its working set is at most AUTO_MEMORY_FRACTION of the free memory."""
    e, c, t = inputs()
    backend = get_backend("torch")
    need = mode_choice.speed_working_set_bytes(24, 16, 200, torch.float32, backend, 2**20)
    assert need > (24 * 16 + 200 * 16) * 4  # more than the gradients
    free_memory.value = int(need / mode_choice.AUTO_MEMORY_FRACTION) + 1
    assert ran_speed(linear_cross_entropy(e, c, t, impl="torch", speed_chunk_bytes=2**20))
    mode_choice.clear_choices()
    free_memory.value = int(need / mode_choice.AUTO_MEMORY_FRACTION) - 1
    assert not ran_speed(linear_cross_entropy(e, c, t, impl="torch", speed_chunk_bytes=2**20))
    mode_choice.clear_choices()
    free_memory.value = None  # unknown free memory: the safe mode
    assert not ran_speed(linear_cross_entropy(e, c, t, impl="torch", speed_chunk_bytes=2**20))


def test_working_set_grows_with_the_chunk_budget_and_counts_triton_accumulators():
    torch_backend = get_backend("torch")
    small = mode_choice.speed_working_set_bytes(8192, 2304, 256000, torch.bfloat16, torch_backend, 2**26)
    large = mode_choice.speed_working_set_bytes(8192, 2304, 256000, torch.bfloat16, torch_backend, 2**31)
    assert large > small > (8192 + 256000) * 2304 * 2  # above the gradients themselves
    # The Triton backend's plan at the paper shape with the GPU's 128-row blocks: 2 chunks of 4096 rows at a
    # 2 GiB budget, 8 of 1024 at 512 MiB.
    two = plan_triton(8192, 2304, 256000, torch.bfloat16, 2 * 1024**3, 128)
    assert (two.rows, two.chunks, two.fp32_dc) == (4096, 2, False)
    grads = (8192 + 256000) * 2304 * 2
    assert grads + 4096 * 256000 * 2 < two.working_set < grads + 4096 * 256000 * 2 + 4096 * 2304 * 4 * 4
    # Speed mode's measured peak above the inputs there: 3,438 MB (H200, BENCHMARKS.md, paper table).
    assert abs(two.working_set / 1e6 - 3438) < 0.03 * 3438
    eight = plan_triton(8192, 2304, 256000, torch.bfloat16, 2**29, 128)
    assert (eight.rows, eight.chunks, eight.fp32_dc) == (1024, 8, True)
    assert eight.working_set > grads + 256000 * 2304 * 4  # beyond 2 chunks dC is accumulated in fp32


@pytest.mark.skipif(not HAS_TRITON_PATH, reason="needs Triton (CUDA, or TRITON_INTERPRET=1)")
def test_small_calls_on_triton_take_memory_mode(free_memory, monkeypatch):
    """Below SPEED_MIN_WORK multiply-adds the GEMM speed mode saves is worth less than its extra launches. (64
    rows: two of the interpreter's 32-row blocks, so that speed mode's plan is within torch.compile's memory.)"""
    monkeypatch.setattr(mode_choice, "SPEED_MIN_HIDDEN", 32)
    e, c, t = inputs(n=64, d=32, v=300)
    loss = linear_cross_entropy(e, c, t, impl="triton")
    assert not ran_speed(loss)
    mode_choice.clear_choices()
    monkeypatch.setattr(mode_choice, "SPEED_MIN_WORK", 64 * 32 * 300)  # the threshold is inclusive
    loss = linear_cross_entropy(e, c, t, impl="triton")
    assert ran_speed(loss)
    ref = linear_cross_entropy(e, c, t, impl="triton", mode="memory")
    g, g_ref = torch.autograd.grad(loss, (e, c)), torch.autograd.grad(ref, (e, c))
    assert torch.allclose(loss, ref, rtol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g, g_ref, strict=True))


@pytest.mark.skipif(not HAS_TRITON_PATH, reason="needs Triton (CUDA, or TRITON_INTERPRET=1)")
def test_small_hidden_sizes_on_triton_take_memory_mode(free_memory, monkeypatch):
    """Below SPEED_MIN_HIDDEN speed mode's per-logit work costs more than the GEMM it saves (measured at
    Qwen2.5-0.5B's D=896: 1.8x memory mode's time), whatever N is; the rule is inclusive."""
    monkeypatch.setattr(mode_choice, "SPEED_MIN_WORK", 0)
    e, c, t = inputs(n=64, d=32, v=300)
    monkeypatch.setattr(mode_choice, "SPEED_MIN_HIDDEN", 33)
    assert not ran_speed(linear_cross_entropy(e, c, t, impl="triton"))
    mode_choice.clear_choices()
    monkeypatch.setattr(mode_choice, "SPEED_MIN_HIDDEN", 32)
    assert ran_speed(linear_cross_entropy(e, c, t, impl="triton"))
    assert mode_choice.SPEED_MIN_HIDDEN == 32 and mode_choice.choose_mode(
        e.reshape(-1, 32), c, "torch", wants_grad=True, reduction="mean", return_lse=False, softcap=None,
        label_smoothing=0.0, speed_chunk_bytes=None) == "speed"  # the torch path has no such rule


@pytest.mark.parametrize(
    "dtype,kwargs,why",
    [
        (torch.float16, {}, "fp16"),
        (torch.float32, {"reduction": "none"}, "scalar loss"),
        (torch.float32, {"return_lse": True}, "LSE"),
        (torch.float32, {"softcap": 20.0, "label_smoothing": 0.1}, "label_smoothing"),
    ],
)
def test_calls_speed_mode_cannot_compute_take_memory_mode_silently(free_memory, caplog, dtype, kwargs, why):
    """Where mode="speed" raises (options.speed_mode_problem), auto takes memory mode: no warning (the user did
    not ask for speed), one INFO line that says why."""
    e, c, t = inputs(dtype=dtype)
    with caplog.at_level(logging.INFO, logger="cce_patch"):
        out = linear_cross_entropy(e, c, t, impl="torch", **kwargs)
        out = linear_cross_entropy(e, c, t, impl="torch", **kwargs)
    loss = out[0] if isinstance(out, tuple) else out
    assert not ran_speed(loss)
    (loss.sum() if loss.dim() else loss).backward()
    assert e.grad is not None and torch.isfinite(e.grad.float()).all()
    records = [r for r in caplog.records if r.name == "cce_patch"]
    assert not [r for r in records if r.levelno >= logging.WARNING]
    infos = [r.getMessage() for r in records if r.levelno == logging.INFO]
    assert len(infos) == 1 and "memory mode" in infos[0] and why in infos[0]


def test_no_grad_and_empty_calls_decide_nothing(free_memory, caplog):
    e, c, t = inputs()
    with caplog.at_level(logging.DEBUG, logger="cce_patch"), torch.no_grad():
        linear_cross_entropy(e, c, t, impl="torch")
    linear_cross_entropy(e[:0], c, t[:0], impl="torch").backward()
    assert free_memory.reads == 0 and not [r for r in caplog.records if "mode='auto'" in r.getMessage()]


def test_decided_once_per_shape_and_logged_once_per_outcome(free_memory, caplog):
    """Free memory is read once per shape; a new N with the same outcome logs at DEBUG only; a new outcome
    (here: memory pressure) logs one more INFO line."""
    with caplog.at_level(logging.DEBUG, logger="cce_patch"):
        for _ in range(3):
            linear_cross_entropy(*inputs(n=24), impl="torch")
        assert free_memory.reads == 1
        linear_cross_entropy(*inputs(n=40), impl="torch")
        assert free_memory.reads == 2
        free_memory.value = 1  # nothing fits now; the cached shapes keep their choice
        assert ran_speed(linear_cross_entropy(*inputs(n=24), impl="torch"))
        assert not ran_speed(linear_cross_entropy(*inputs(n=56), impl="torch"))
    auto = [r for r in caplog.records if "mode='auto'" in r.getMessage()]
    infos = [r.getMessage() for r in auto if r.levelno == logging.INFO]
    debugs = [r.getMessage() for r in auto if r.levelno == logging.DEBUG]
    assert len(infos) == 2 and "speed mode for N=24" in infos[0] and "memory mode for N=56" in infos[1]
    assert "more than 0.5 x" in infos[1]
    assert len(debugs) == 1 and "speed mode for N=40" in debugs[0]


def test_out_of_memory_in_speed_mode_reruns_in_memory_mode_and_sticks(free_memory, monkeypatch, caplog):
    """Free memory can shrink after the first step (optimizer states): if speed mode runs out of memory under
    auto, the call is answered by memory mode and the shape stays there. Asked for explicitly, it raises."""
    calls = []

    def no_memory(*args):
        calls.append(args)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(api.SpeedModeFunction, "apply", no_memory)
    e, c, t = inputs()
    with caplog.at_level(logging.INFO, logger="cce_patch"):
        loss = linear_cross_entropy(e, c, t, impl="torch")
        assert not ran_speed(loss) and len(calls) == 1
        de, = torch.autograd.grad(loss, (e,))
        ref = linear_cross_entropy(e, c, t, impl="torch", mode="memory")
        assert torch.equal(loss, ref) and torch.equal(de, torch.autograd.grad(ref, (e,))[0])
        linear_cross_entropy(e, c, t, impl="torch")
        assert len(calls) == 1  # not tried again for this shape
    assert any("ran out of memory" in r.getMessage() for r in caplog.records)
    with pytest.raises(torch.OutOfMemoryError):
        linear_cross_entropy(e, c, t, impl="torch", mode="speed")


@pytest.mark.skipif(not HAS_TRITON_PATH, reason="needs Triton (CUDA, or TRITON_INTERPRET=1)")
def test_out_of_memory_rerun_still_checks_the_targets(free_memory, monkeypatch):
    """The Triton speed path checks the targets late, at its own host sync; when it runs out of memory before
    that sync, the memory-mode rerun must check them itself: a bad target raises, never a silently wrong loss."""
    monkeypatch.setattr(mode_choice, "SPEED_MIN_WORK", 0)
    monkeypatch.setattr(mode_choice, "SPEED_MIN_HIDDEN", 0)

    def no_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(api.SpeedModeFunction, "apply", no_memory)
    e, c, t = inputs(n=64, d=32, v=300)
    t[5] = 300
    with pytest.raises(ValueError, match=r"outside \[0, 300\)"):
        linear_cross_entropy(e, c, t, impl="triton")
    t[5] = 7
    loss = linear_cross_entropy(e, c, t, impl="triton")  # the shape now stays in memory mode
    assert not ran_speed(loss) and torch.isfinite(loss)


def test_patched_model_default_runs_auto(free_memory):
    """A model patched with the default config gets speed mode for its (mean) loss where it fits."""
    pytest.importorskip("transformers")
    from models_tiny import tiny_model

    from cce_patch import patch

    model = patch(tiny_model("llama")).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    out = model(input_ids=ids, labels=ids)
    assert ran_speed(out.loss)
    free_memory.value = 1
    mode_choice.clear_choices()
    assert not ran_speed(model(input_ids=ids, labels=ids).loss)


def test_free_memory_reads_something_on_cpu():
    free = mode_choice.free_memory_bytes(torch.device("cpu"))
    assert free is None or free > 0
    assert mode_choice.free_memory_bytes(torch.device("meta")) is None


def test_under_torch_compile_the_rule_is_traced_once_without_a_graph_break(free_memory):
    """fullgraph compilation of a default call: no graph break, free memory read once at trace time, the
    compiled loss and gradients equal eager's; with little free memory the graph holds memory mode; a symbolic N
    (dynamic shapes) is compared with the rule's range in the graph, not a graph break."""
    torch._dynamo.reset()
    assert torch.compiler.assume_constant_result(lambda: None)._dynamo_marked_constant  # what _speed_rows carries
    assert mode_choice._speed_rows._dynamo_marked_constant
    e, c, t = inputs(n=24)

    def fn(e, c, t):
        return linear_cross_entropy(e, c, t, impl="torch")

    def graph_of(*args) -> str:
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(fn)(*args)
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
        return explanation.graphs[0].code

    assert "cce_patch.speed_forward" in graph_of(e, c, t) and free_memory.reads == 1
    torch._dynamo.reset()
    loss = torch.compile(fn, fullgraph=True, backend="aot_eager")(e, c, t)
    g = torch.autograd.grad(loss, (e, c))
    ref = linear_cross_entropy(e, c, t, impl="torch", mode="memory")
    assert torch.allclose(loss, ref, rtol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(g, torch.autograd.grad(ref, (e, c)), strict=True))
    free_memory.value = 1
    assert "cce_patch.memory_forward" in graph_of(e, c, t)
    free_memory.value = 10**12
    torch._dynamo.mark_dynamic(e, 0)
    torch._dynamo.mark_dynamic(t, 0)
    assert "cce_patch.speed_forward" in graph_of(e, c, t)
    lo, hi = mode_choice._speed_rows("cpu", None, "torch", 16, 200, torch.float32, "mean", False, None, 0.0, None)
    need = mode_choice.speed_working_set_bytes(hi, 16, 200, torch.float32, get_backend("torch"), 2 * 1024**3)
    assert lo == 1 and need <= mode_choice.AUTO_MEMORY_FRACTION * 10**12
    assert mode_choice._speed_rows("cpu", None, "triton", 16, 200, torch.float32, "mean", False, None, 0.0,
                                   None)[0] >= 2**31  # D=16 < SPEED_MIN_HIDDEN: memory mode at every N
    mode_choice.SPEED_MIN_HIDDEN, saved = 16, mode_choice.SPEED_MIN_HIDDEN
    try:
        assert mode_choice._speed_rows("cpu", None, "triton", 16, 200, torch.float32, "mean", False, None, 0.0,
                                       None)[0] == math.ceil(mode_choice.SPEED_MIN_WORK / (16 * 200))
    finally:
        mode_choice.SPEED_MIN_HIDDEN = saved
    assert mode_choice._speed_rows("cpu", None, "torch", 16, 200, torch.float16, "mean", False, None, 0.0,
                                   None) == (1, 0)


@pytest.mark.skipif(not HAS_TRITON_PATH, reason="needs Triton (CUDA, or TRITON_INTERPRET=1)")
def test_auto_takes_memory_mode_where_speed_mode_would_hold_more_than_torch_compile(free_memory, monkeypatch):
    """A head with D > V: speed mode's fp32 N x D buffer alone is more than torch.compile's fp32 N x V logits, so
    no plan is within torch.compile's memory and auto takes memory mode (with plenty of free memory); forced
    speed mode still runs, and both give the same loss and gradients."""
    monkeypatch.setattr(mode_choice, "SPEED_MIN_WORK", 0)
    monkeypatch.setattr(mode_choice, "SPEED_MIN_HIDDEN", 0)
    e, c, t = inputs(n=16, d=64, v=40)
    plan = get_backend("triton").speed_plan(16, 64, 40, torch.float32, None)
    assert not plan.within_compile and plan.working_set > plan.compile_bytes
    auto = linear_cross_entropy(e, c, t, impl="triton")
    assert not ran_speed(auto)
    speed = linear_cross_entropy(e, c, t, impl="triton", mode="speed")
    assert ran_speed(speed)
    g_auto, g_speed = torch.autograd.grad(auto, (e, c)), torch.autograd.grad(speed, (e, c))
    assert torch.allclose(auto, speed, rtol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_auto, g_speed, strict=True))
    mode_choice.clear_choices()
    e, c, t = inputs(n=64, d=32, v=300)  # V >> D: within torch.compile's memory, speed mode
    assert get_backend("triton").speed_plan(64, 32, 300, torch.float32, None).within_compile
    assert ran_speed(linear_cross_entropy(e, c, t, impl="triton"))


def test_a_decided_call_signature_costs_one_lookup(free_memory, monkeypatch):
    """Once a shape is decided, auto neither reads free memory nor runs the rule again for it."""
    e, c, t = inputs()
    first = linear_cross_entropy(e, c, t, impl="torch")
    reads = free_memory.reads

    def rule_must_not_run(*args, **kwargs):
        raise AssertionError("the rule ran again for a decided shape")

    monkeypatch.setattr(mode_choice, "_choose", rule_must_not_run)
    again = linear_cross_entropy(e, c, t, impl="torch")
    assert free_memory.reads == reads and ran_speed(first) == ran_speed(again)
    with pytest.raises(AssertionError, match="ran again"):  # a new shape does run it
        linear_cross_entropy(*inputs(n=25), impl="torch")


@pytest.mark.skipif(not HAS_TRITON_PATH, reason="needs Triton (CUDA, or TRITON_INTERPRET=1)")
def test_the_planned_chunks_and_an_explicit_budget_are_decided_apart(free_memory, monkeypatch):
    """speed_chunk_bytes=None (the plan: two chunks here, within torch.compile's memory) and an explicit budget
    equal to the plan's 2 GiB cap (one chunk here, more than torch.compile's) are different plans of one shape:
    each gets its own answer, whichever comes first."""
    monkeypatch.setattr(mode_choice, "SPEED_MIN_WORK", 0)
    monkeypatch.setattr(mode_choice, "SPEED_MIN_HIDDEN", 0)
    e, c, t = inputs(n=64, d=32, v=300)
    backend = get_backend("triton")
    assert backend.speed_plan(64, 32, 300, torch.float32, None).within_compile
    assert not backend.speed_plan(64, 32, 300, torch.float32, 2 * 1024**3).within_compile
    assert ran_speed(linear_cross_entropy(e, c, t, impl="triton"))
    assert not ran_speed(linear_cross_entropy(e, c, t, impl="triton", speed_chunk_bytes=2 * 1024**3))
