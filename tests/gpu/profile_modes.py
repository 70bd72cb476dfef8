"""Where the time of each mode goes, at the paper shape (bf16), in one device call.

Run on the device: ``python3 tests/gpu/profile_modes.py [regime ...]``. Prints, for KERNEL_NOTES.md:
  1. speed mode's parts per row chunk: the storing forward kernel, dE = Q @ C (fp32 out), dC += Q^T (sE);
  2. the whole speed-mode op (fwd+bwd) for several chunk budgets;
  3. the memory mode's fwd+bwd for several dS chunk budgets (DS_CHUNK_BYTES);
  4. speed mode with q written by pointer stores instead of the copy engine (Q_TMA_STORE).
``--trace [regime ...]`` instead profiles both modes with torch.profiler: GPU time per kernel, host time per
call, and the wall time per call (their difference is the time the GPU waits on the host).
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.testing

from cce_patch import linear_cross_entropy
from cce_patch.bench.memory import peak_mb_above_inputs
from cce_patch.bench.regimes import make_inputs
from cce_patch.ops import triton_backend as tb
from cce_patch.ops import triton_speed as ts
from cce_patch.ops.spec import LossSpec


def bench(fn, rep=400) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=rep, return_mode="median")


def step_fn(e, c, t, **kw):
    ee, cc = e.detach().requires_grad_(), c.detach().requires_grad_()

    def step():
        ee.grad = cc.grad = None
        linear_cross_entropy(ee, cc, t, impl="triton", **kw).backward()
        return ee.grad, cc.grad

    return step


def speed_parts(e, c, t, rows: int) -> None:
    n, d = e.shape
    v = c.shape[0]
    q = torch.empty((rows, triton.cdiv(v, 8) * 8), dtype=e.dtype, device=e.device)[:, :v]
    e_c, t_c = e[:rows], t[:rows]
    mref = ts.target_logits(e_c, c, None, t_c, None)
    spec = LossSpec()
    fwd_plain = bench(lambda: tb.launch_forward(e_c, c, None, t_c, spec))
    fwd_store = bench(lambda: tb.launch_forward(e_c, c, None, t_c, spec, q=q, mref=mref))
    q.copy_(torch.randn_like(q, dtype=torch.float32).mul_(1e-3))
    se = e_c * 0.5
    out = torch.empty_like(c)
    de = bench(lambda: torch.mm(q, c, out_dtype=torch.float32))
    dc_first = bench(lambda: torch.mm(q.T, se, out=out))
    dc_acc = bench(lambda: out.addmm_(q.T, se))
    k = triton.cdiv(n, rows)
    print(f"  rows {rows:5d} x{k}: fwd {fwd_plain:6.2f} -> storing fwd {fwd_store:6.2f} | dE {de:6.2f} | "
          f"dC first {dc_first:6.2f} / accumulate {dc_acc:6.2f} | sum x{k} = "
          f"{k * (fwd_store + de) + dc_first + (k - 1) * dc_acc:6.2f} ms", flush=True)


def trace(regime: str, mode: str) -> None:
    """torch.profiler over a few fwd+bwd calls: GPU time per kernel, and GPU busy time against wall time
    (the gap is launch latency and host syncs)."""
    from torch.profiler import ProfilerActivity, profile

    e, c, t = make_inputs(regime, 8192, 2304, 256000, device="cuda", dtype=torch.bfloat16)
    st = step_fn(e, c, t, mode=mode)
    for _ in range(3):
        st()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start.record()
        for _ in range(5):
            st()
        end.record()
        torch.cuda.synchronize()
    wall = start.elapsed_time(end) / 5
    events = [ev for ev in prof.key_averages() if ev.device_time_total > 0]
    busy = sum(ev.self_device_time_total for ev in events) / 1e3 / 5
    print(f"== trace {regime} mode={mode}: {wall:.2f} ms per call (events), GPU kernels {busy:.2f} ms")
    for ev in sorted(events, key=lambda ev: -ev.self_device_time_total)[:12]:
        print(f"  {ev.self_device_time_total / 1e3 / 5:8.3f} ms  x{ev.count // 5:<3d} {ev.key[:110]}")
    print("  host side (self CPU time per call):")
    for ev in sorted(prof.key_averages(), key=lambda ev: -ev.self_cpu_time_total)[:14]:
        print(f"  {ev.self_cpu_time_total / 1e3 / 5:8.3f} ms  x{ev.count // 5:<3d} {ev.key[:110]}")


def main(regimes: list[str]) -> None:
    n, d, v = 8192, 2304, 256000
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name())
    for regime in regimes:
        e, c, t = make_inputs(regime, n, d, v, device="cuda", dtype=torch.bfloat16)
        print(f"== {regime}")
        with torch.no_grad():
            fwd_ms = bench(lambda e=e, c=c, t=t: linear_cross_entropy(e, c, t, impl="triton"))
            print(f"  op fwd (no grad) {fwd_ms:6.2f} ms")
        for rows in (2048, 4096, 8192):
            speed_parts(e, c, t, rows)
        for budget in (2**30, 2**31, 3 * 2**30):
            st = step_fn(e, c, t, mode="speed", speed_chunk_bytes=budget)
            ms = bench(st)
            mb = peak_mb_above_inputs(st, e.device)
            print(f"  speed op budget {budget / 2**30:.0f} GiB: fwd+bwd {ms:6.2f} ms, {mb:7.1f} MB", flush=True)
        default = tb.DS_CHUNK_BYTES
        for chunk in (default, 3 * default // 2, 2 * default):
            tb.DS_CHUNK_BYTES = chunk
            st = step_fn(e, c, t)
            ms = bench(st)
            mb = peak_mb_above_inputs(st, e.device)
            print(f"  memory op dS chunk {chunk / 2**20:.0f} MiB: fwd+bwd {ms:6.2f} ms, {mb:7.1f} MB", flush=True)
        tb.DS_CHUNK_BYTES = default
        for tma_store in (False, True):
            tb.Q_TMA_STORE = tma_store
            print(f"  Q_TMA_STORE={tma_store}: speed fwd+bwd {bench(step_fn(e, c, t, mode='speed')):6.2f} ms")
        del e, c, t
        torch.cuda.empty_cache()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--trace"]:
        for regime in sys.argv[2:] or ["flat"]:
            trace(regime, "speed")
            trace(regime, "memory")
    else:
        main(sys.argv[1:] or ["lm", "flat"])
