"""Vocab-parallel CCE across the GPUs of one host (NCCL) against the single-GPU op, at the paper shape.

    torchrun --standalone --nproc_per_node 2 tests/gpu/vocab_parallel_bench.py --out vp.json
    torchrun --standalone --nproc_per_node 2 tests/gpu/vocab_parallel_bench.py --device cpu --tokens 256 --hidden 64 \\
        --vocab 4001 --dtype fp32 --out /tmp/vp.json                                            # a CPU dry run of the plumbing

Every rank builds the same inputs (one seed) and keeps its torch.chunk block of the classifier's rows. Measured on
every rank: the loss, dE and its rows of dC from the vocab-parallel op against the single-GPU op on the whole
classifier (both computed there, so the comparison needs no transfer), the fwd+bwd time of each (median of
``--reps`` timed calls after warm-up), and each one's peak memory above its inputs. Rank 0 writes the JSON: the
numbers of every rank, and the worst.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from oracle import rel_err  # noqa: E402

from cce_patch import linear_cross_entropy  # noqa: E402
from cce_patch.ops.vocab_parallel import vocab_parallel_linear_cross_entropy  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def timed(fn, device: torch.device, warmup: int, reps: int) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on a GPU, the wall clock elsewhere)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(stop))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def peak_above(fn, device: torch.device) -> float | None:
    """Peak memory (MiB) that one call of ``fn`` needs above what was allocated before it (GPU only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=2304)
    parser.add_argument("--vocab", type=int, default=256000)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--impl", default="auto")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    if args.device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = DTYPES[args.dtype]

    g = torch.Generator(device=device).manual_seed(0)
    e = (torch.randn(args.tokens, args.hidden, device=device, generator=g) / args.hidden**0.25).to(dtype)
    c = (torch.randn(args.vocab, args.hidden, device=device, generator=g) / args.hidden**0.25).to(dtype)
    t = torch.randint(0, args.vocab, (args.tokens,), device=device, generator=g)
    t[torch.rand(args.tokens, device=device, generator=g) < 0.1] = -100
    rows = -(-args.vocab // world)
    start = min(rank * rows, args.vocab)
    c_shard = c[start:start + rows].clone()
    del g

    def full_step():
        e_ = e.detach().requires_grad_()
        c_ = c.detach().requires_grad_()
        loss = linear_cross_entropy(e_, c_, t, impl=args.impl)
        loss.backward()
        return loss.detach(), e_.grad, c_.grad

    def vp_step():
        e_ = e.detach().requires_grad_()
        c_ = c_shard.detach().requires_grad_()
        loss = vocab_parallel_linear_cross_entropy(e_, c_, t, impl=args.impl)
        loss.backward()
        return loss.detach(), e_.grad, c_.grad

    loss_full, de_full, dc_full = full_step()
    loss_vp, de_vp, dc_vp = vp_step()
    mine = {
        "rank": rank,
        "loss_vs_single_gpu": rel_err(loss_vp.float(), loss_full.float()),
        "dE_vs_single_gpu": rel_err(de_vp.float(), de_full.float()),
        "dC_rows_vs_single_gpu": rel_err(dc_vp.float(), dc_full[start:start + rows].float()),
    }
    del loss_full, de_full, dc_full, loss_vp, de_vp, dc_vp
    mine["single_gpu_ms"] = timed(full_step, device, args.warmup, args.reps)
    mine["vocab_parallel_ms"] = timed(vp_step, device, args.warmup, args.reps)
    mine["single_gpu_peak_mib_above_inputs"] = peak_above(full_step, device)
    mine["vocab_parallel_peak_mib_above_inputs"] = peak_above(vp_step, device)
    mine["classifier_mib_here"] = {"single_gpu": c.numel() * c.element_size() / 2**20,
                                   "vocab_parallel": c_shard.numel() * c_shard.element_size() / 2**20}
    ranks: list = [None] * world
    dist.all_gather_object(ranks, mine)
    if rank == 0:
        keys = [k for k in mine if k.endswith("_vs_single_gpu") or k.endswith("_ms") or k.endswith("_inputs")]
        worst = {k: max(r[k] for r in ranks) if ranks[0][k] is not None else None for k in keys}
        result = {"shape": {"n": args.tokens, "d": args.hidden, "v": args.vocab, "dtype": args.dtype, "impl": args.impl},
                  "world_size": world, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  "versions": {"torch": torch.__version__}, "date": time.strftime("%Y-%m-%d"),
                  "worst_over_ranks": worst, "ranks": ranks}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(json.dumps(result["worst_over_ranks"], indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
