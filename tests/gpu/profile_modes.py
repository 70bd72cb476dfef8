"""Where the time of each mode goes, at the paper shape (bf16), in one device call.

Run on the device: ``python3 tests/gpu/profile_modes.py [regime ...]``. Prints, for KERNEL_NOTES.md:
  1. speed mode's parts per row chunk: the storing forward kernel, dE = Q @ C (fp32 out), dC += Q^T (sE);
  2. the whole speed-mode op (fwd+bwd) for several chunk budgets;
  3. the memory mode's fwd+bwd for several dS chunk budgets (DS_CHUNK_BYTES);
  4. speed mode with q written by pointer stores instead of the copy engine (Q_TMA_STORE).
``--fp32-tiles [regime ...]`` sweeps tile shapes for fp32 inputs with TF32 opted in.
``--store-tiles [regime ...]`` sweeps tile shapes of the speed-mode storing kernel.
``--gaps [regime ...]`` lists the stretches where the GPU idles between kernels (and what the host was doing),
and prices each host sync of speed mode by timing the op without it.
``--fp32-ieee [N]`` times IEEE fp32 (TF32 off, torch's default) at N tokens (default 8192), D=2304, V=256000, lm:
one SGEMM, both modes on each backend (Triton kernels, the chunked torch path on cuBLAS) and plain torch.
``--trace [regime ...]`` instead profiles both modes with torch.profiler: GPU time per kernel, host time per
call, and the wall time per call (their difference is the time the GPU waits on the host).
``--trace`` and ``--gaps`` profile the shape in ``CCE_PROFILE_SHAPE`` ("N,D,V", default the paper's), e.g.
``CCE_PROFILE_SHAPE=2048,3072,32064`` for Phi 3.5's head at 2k tokens, where per-call host work is most of the time.
``CCE_PROFILE_OPTIONS`` adds options to every profiled call (``--trace``/``--gaps``), and ``CCE_PROFILE_MODES``
names the modes they profile (default "speed,memory"), e.g. the filter where nothing can be skipped:
``CCE_PROFILE_OPTIONS=filter_eps=2^-12,filter_vocab_order=natural CCE_PROFILE_MODES=speed ... --trace flat``.
"""

from __future__ import annotations

import os
import sys

import torch
import triton
import triton.testing

from cce_patch import linear_cross_entropy
from cce_patch.bench.memory import peak_mb_above_inputs
from cce_patch.bench.methods import parse_spec
from cce_patch.bench.regimes import make_inputs
from cce_patch.bench.timing import event_median_ms
from cce_patch.ops.fused import lse_kernel as lk
from cce_patch.ops.fused import memory_mode as mm
from cce_patch.ops.fused import speed_mode as ts
from cce_patch.ops.fused import tiles as tb
from cce_patch.ops.fused.row_prep_kernel import prepare_rows
from cce_patch.ops.spec import LossSpec

#: The shape ``--trace`` and ``--gaps`` profile (N, D, V).
SHAPE = tuple(int(x) for x in os.environ.get("CCE_PROFILE_SHAPE", "8192,2304,256000").split(","))
#: The modes ``--trace`` and ``--gaps`` profile.
MODES = os.environ.get("CCE_PROFILE_MODES", "speed,memory").split(",")


#: Options every ``--trace``/``--gaps`` call adds (``CCE_PROFILE_OPTIONS="name=value,..."``).
OPTIONS = parse_spec(f"ours[{os.environ.get('CCE_PROFILE_OPTIONS', '')}]")[1]


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
    _, anchor = prepare_rows(e_c, c, None, t_c, LossSpec(), ts.ANCHOR_MARGIN)
    spec = LossSpec()
    fwd_plain = bench(lambda: lk.launch_lse_forward(e_c, c, None, t_c, spec))
    fwd_store = bench(lambda: lk.launch_lse_forward(e_c, c, None, t_c, spec, q=q, anchor=anchor))
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

    e, c, t = make_inputs(regime, *SHAPE, device="cuda", dtype=torch.bfloat16)
    st = step_fn(e, c, t, mode=mode, **OPTIONS)
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
    print(f"== trace {regime} N,D,V={SHAPE} mode={mode} {OPTIONS or ''}: {wall:.2f} ms per call (events), "
          f"GPU kernels {busy:.2f} ms")
    for ev in sorted(events, key=lambda ev: -ev.self_device_time_total)[:12]:
        print(f"  {ev.self_device_time_total / 1e3 / 5:8.3f} ms  x{ev.count // 5:<3d} {ev.key[:110]}")
    print("  host side (self CPU time per call):")
    for ev in sorted(prof.key_averages(), key=lambda ev: -ev.self_cpu_time_total)[:14]:
        print(f"  {ev.self_cpu_time_total / 1e3 / 5:8.3f} ms  x{ev.count // 5:<3d} {ev.key[:110]}")


def gaps(regime: str, mode: str, min_us: float = 20.0) -> None:
    """Where the GPU waits for the host in one fwd+bwd call: every idle stretch between consecutive kernels
    longer than ``min_us`` (from the profiler's chrome trace), with the kernels on each side and the host ops
    that were running during it. Then the op timed without profiler, with and without each host sync
    (target check: ``check_targets=False``; range check: in_range dropped), to price each one."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    e, c, t = make_inputs(regime, *SHAPE, device="cuda", dtype=torch.bfloat16)
    st = step_fn(e, c, t, mode=mode, **OPTIONS)
    for _ in range(3):
        st()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            st()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    kernels = sorted((ev for ev in events if ev.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                     key=lambda ev: ev["ts"])
    cpu_ops = [ev for ev in events if ev.get("cat") in ("cpu_op", "cuda_runtime", "python_function")]
    half = len(kernels) // 2  # the second call (the first may include allocator growth)
    ks = kernels[half - 1:]  # with the last op of call 1: the gap before call 2 is its host prelude
    busy = sum(k["dur"] for k in ks)
    span = ks[-1]["ts"] + ks[-1]["dur"] - ks[0]["ts"]
    print(f"== gaps {regime} N,D,V={SHAPE} mode={mode} {OPTIONS or ''}: {len(ks)} GPU ops, busy {busy / 1e3:.2f} ms "
          f"of a {span / 1e3:.2f} ms span")
    total = 0.0
    for prev, nxt in zip(ks, ks[1:], strict=False):
        gap = nxt["ts"] - (prev["ts"] + prev["dur"])
        if gap < min_us:
            continue
        total += gap
        g0, g1 = prev["ts"] + prev["dur"], nxt["ts"]
        host = sorted({ev["name"][:40] for ev in cpu_ops if ev["ts"] < g1 and ev["ts"] + ev.get("dur", 0) > g0
                       and ev.get("dur", 0) < 5e4})
        print(f"  {gap:8.1f} us  after {prev['name'][:50]!r}  before {nxt['name'][:50]!r}")
        print(f"             host: {', '.join(host)[:300]}")
    print(f"  idle stretches >= {min_us:.0f} us: {total / 1e3:.2f} ms in all")
    del prof, events

    import dataclasses

    from cce_patch.ops import api

    def step_with(check_targets: bool, range_sync: bool):
        ee, cc = e.detach().requires_grad_(), c.detach().requires_grad_()
        original = api.get_backend

        def patched(name):
            backend = original(name)
            with_grads = backend.forward_with_grads

            def no_range(*args):
                out = with_grads(*args)
                return (*out[:5], None, out[6])  # in_range None: no sync, no fallback decision
            return backend if range_sync else dataclasses.replace(backend, forward_with_grads=no_range)

        def step():
            api.get_backend = patched
            try:
                ee.grad = cc.grad = None
                linear_cross_entropy(ee, cc, t, impl="triton", mode=mode, check_targets=check_targets).backward()
            finally:
                api.get_backend = original
        return step

    for check, rng in ((True, True), (False, True), (True, False), (False, False)):
        if mode != "speed" and not rng:
            continue
        print(f"  {mode} fwd+bwd, target check {'on ' if check else 'off'}, range sync {'on ' if rng else 'off'}: "
              f"{bench(step_with(check, rng)):6.2f} ms", flush=True)


STORE_TILES = [  # (block_m, block_n, block_k, num_warps, num_stages, q through the copy engine)
    (128, 256, 64, 8, 3, True),   # the forward's tiles (default)
    (128, 128, 64, 4, 3, True),   # half the accumulator: two programs per SM, one's epilogue under the other's matmul
    (128, 128, 64, 4, 3, False),
    (128, 128, 64, 4, 4, False),
    (128, 128, 64, 8, 3, True),
]


def store_tiles(regime: str) -> None:
    """Tile shapes for speed mode's storing forward kernel alone ("store" in ``tile_config``): the kernel on
    4,096 rows, then the whole speed-mode op."""
    e, c, t = make_inputs(regime, 8192, 2304, 256000, device="cuda", dtype=torch.bfloat16)
    original, tma_store = tb.tile_config, lk.Q_TMA_STORE
    rows = 4096
    q = torch.empty((rows, 256000), dtype=e.dtype, device=e.device)
    _, anchor = prepare_rows(e[:rows], c, None, t[:rows], LossSpec(), ts.ANCHOR_MARGIN)
    print(f"== storing kernel tiles, {regime}, {rows} rows (then the speed op fwd+bwd)")
    for *tiles, tma in STORE_TILES:
        cfg = tb.TileConfig(*tiles)
        tb.tile_config = lambda dtype, kernel="forward", cfg=cfg: cfg if kernel == "store" else original(dtype, kernel)  # noqa: E731
        lk.Q_TMA_STORE = tma
        try:
            k_ms = bench(lambda: lk.launch_lse_forward(e[:rows], c, None, t[:rows], LossSpec(), q=q, anchor=anchor))
            op_ms = bench(step_fn(e, c, t, mode="speed"))
            print(f"  {tiles} q_tma={tma:d}: kernel {k_ms:6.2f} ms, speed op {op_ms:6.2f} ms", flush=True)
        except Exception as exc:  # noqa: BLE001 - a shape may not fit shared memory: report, go on
            print(f"  {tiles} q_tma={tma:d}: failed {type(exc).__name__}: {str(exc)[:120]}", flush=True)
    tb.tile_config, lk.Q_TMA_STORE = original, tma_store


FP32_TILES = [  # fp32 inputs with TF32 opted in: the same tile for every kernel, backward one stage deeper
    (128, 128, 32, 8, 3),  # the default
    (128, 256, 32, 8, 3),  # the bf16 tile's bytes per K step
    (128, 128, 64, 8, 2),
    (128, 64, 32, 4, 4),
]


def fp32_tiles(regime: str) -> None:
    """fp32 inputs with TF32 opted in (``torch.backends.cuda.matmul.allow_tf32``): both modes per tile shape."""
    e, c, t = make_inputs(regime, 8192, 2304, 256000, device="cuda", dtype=torch.float32)
    original = tb.tile_config
    torch.backends.cuda.matmul.allow_tf32 = True
    print(f"== fp32 (TF32 opted in) tiles, {regime}")
    for bm, bn, bk, warps, stages in FP32_TILES:
        fc, bc = tb.TileConfig(bm, bn, bk, warps, stages), tb.TileConfig(bm, bn, bk, warps, stages + 1)
        tb.tile_config = lambda dtype, kernel="forward", fc=fc, bc=bc: bc if kernel == "backward" else fc  # noqa: E731
        parts = []
        for label, fn in (("fwd", lambda: linear_cross_entropy(e.detach(), c.detach(), t, impl="triton")),
                          ("memory fwd+bwd", step_fn(e, c, t)), ("speed fwd+bwd", step_fn(e, c, t, mode="speed"))):
            try:
                parts.append(f"{label} {bench(fn, rep=200):6.2f} ms")
            except Exception as exc:  # noqa: BLE001 - a shape may not fit shared memory: report, go on
                parts.append(f"{label} failed ({type(exc).__name__}: {str(exc)[:60]})")
        print(f"  {fc}: " + " | ".join(parts), flush=True)
    tb.tile_config = original
    torch.backends.cuda.matmul.allow_tf32 = False


def fp32_ieee(n: int) -> None:
    """IEEE fp32 (the default: TF32 off): Triton's fp32 ``tl.dot`` with input_precision="ieee" runs on the
    CUDA cores; cuBLAS SGEMM is the reference rate. Which backend should ``impl="auto"`` pick?"""
    torch.backends.cuda.matmul.allow_tf32 = False
    e, c, t = make_inputs("lm", n, 2304, 256000, device="cuda", dtype=torch.float32)
    print(f"== IEEE fp32, N={n}, D=2304, V=256000, lm (median of 3 calls)")
    rows = [("one SGEMM e @ c.T", lambda: torch.mm(e, c.T))]
    for impl in ("triton", "torch"):
        rows.append((f"ours {impl} fwd", lambda impl=impl: linear_cross_entropy(e, c, t, impl=impl)))
        for mode in ("memory", "speed"):
            def step(impl=impl, mode=mode):
                ee, cc = e.detach().requires_grad_(), c.detach().requires_grad_()
                return torch.autograd.grad(linear_cross_entropy(ee, cc, t, impl=impl, mode=mode), (ee, cc))
            rows.append((f"ours {impl} {mode} fwd+bwd", step))

    def plain():
        ee, cc = e.detach().requires_grad_(), c.detach().requires_grad_()
        loss = torch.nn.functional.cross_entropy((ee @ cc.T).float(), t)
        return torch.autograd.grad(loss, (ee, cc))
    rows.append(("torch fwd+bwd", plain))
    for label, fn in rows:
        try:
            with torch.no_grad() if "fwd+bwd" not in label else torch.enable_grad():
                ms = event_median_ms(fn, n_warm=1, n_rep=3)
            print(f"  {label:32s} {ms:9.1f} ms", flush=True)
        except Exception as exc:  # noqa: BLE001 - report and go on (e.g. out of memory)
            print(f"  {label:32s} failed: {type(exc).__name__}: {str(exc)[:100]}", flush=True)
        torch.cuda.empty_cache()


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
        default = mm.DS_CHUNK_BYTES
        for chunk in (default, 3 * default // 2, 2 * default):
            mm.DS_CHUNK_BYTES = chunk
            st = step_fn(e, c, t)
            ms = bench(st)
            mb = peak_mb_above_inputs(st, e.device)
            print(f"  memory op dS chunk {chunk / 2**20:.0f} MiB: fwd+bwd {ms:6.2f} ms, {mb:7.1f} MB", flush=True)
        mm.DS_CHUNK_BYTES = default
        for tma_store in (False, True):
            lk.Q_TMA_STORE = tma_store
            print(f"  Q_TMA_STORE={tma_store}: speed fwd+bwd {bench(step_fn(e, c, t, mode='speed')):6.2f} ms")
        del e, c, t
        torch.cuda.empty_cache()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--fp32-tiles"]:
        for regime in sys.argv[2:] or ["lm"]:
            fp32_tiles(regime)
    elif sys.argv[1:2] == ["--store-tiles"]:
        for regime in sys.argv[2:] or ["flat"]:
            store_tiles(regime)
    elif sys.argv[1:2] == ["--gaps"]:
        for regime in sys.argv[2:] or ["flat"]:
            for mode in MODES:
                gaps(regime, mode)
    elif sys.argv[1:2] == ["--fp32-ieee"]:
        fp32_ieee(int(sys.argv[2]) if len(sys.argv) > 2 else 8192)
    elif sys.argv[1:2] == ["--trace"]:
        for regime in sys.argv[2:] or ["flat"]:
            for mode in MODES:
                trace(regime, mode)
    else:
        main(sys.argv[1:] or ["lm", "flat"])
