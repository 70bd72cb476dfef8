"""A large head under FSDP2 on the GPUs of one host: peak memory per GPU and step time, stock vs ours.

    torchrun --standalone --nproc_per_node 2 tests/gpu/fsdp_head_bench.py --arch qwen2.5-7b --layers 4 \\
        --tokens 8192 --out fsdp_head.json
    torchrun --standalone --nproc_per_node 2 tests/gpu/fsdp_head_bench.py --device cpu --arch tiny-llama \\
        --tokens 64 --steps 2 --out /tmp/fsdp_head.json                            # a CPU dry run of the plumbing

A real architecture (``cce_patch.models.architectures``) at reduced depth, bf16 weights, ``fully_shard`` per
decoder layer + root (accelerate's TRANSFORMER_BASED_WRAP; ``--head-alone`` also gives lm_head its own group,
torchtitan's layout, which exercises the patched forward's unshard of that group, models/sharding.py),
``--tokens`` random tokens per GPU in one sequence, SGD. For stock and patched in turn: the median step time
(forward, backward, optimizer step) after one warm-up step, the peak memory of the timed steps, and the losses
(same seed, so the two runs see the same tokens).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist


def build(arch: str, layers: int | None, device: torch.device, dtype: torch.dtype):
    import transformers

    from cce_patch.models.architectures import architecture_config

    overrides = {"num_hidden_layers": layers} if layers else {}
    config = architecture_config(arch, **overrides)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)


def run(args, patched: bool, device: torch.device) -> dict:
    from torch.distributed.fsdp import FSDPModule, fully_shard

    import cce_patch

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = build(args.arch, args.layers, device, dtype).train()
    if patched:
        cce_patch.patch(model)  # all a sharded layout needs
    for layer in model.model.layers:
        fully_shard(layer)
    if args.head_alone:  # a tied head shares its group with the embedding (FSDP2 refuses a shared parameter in two)
        tied = model.lm_head.weight is model.get_input_embeddings().weight
        fully_shard([model.get_input_embeddings(), model.lm_head] if tied else model.lm_head)
    fully_shard(model)
    assert isinstance(model, FSDPModule) and dist.get_world_size() == args.expect_world
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    vocab = model.config.vocab_size
    g = torch.Generator(device=device).manual_seed(1 + dist.get_rank())
    losses, times = [], []

    def step() -> float:
        ids = torch.randint(0, vocab, (1, args.tokens), device=device, generator=g)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss)

    losses.append(step())  # warm-up: allocator, kernels' first compile
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.steps):
        t0 = time.perf_counter()
        losses.append(step())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(1000 * (time.perf_counter() - t0))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"patched": patched, "step_ms_median": statistics.median(times), "peak_gib": peak, "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="qwen2.5-7b")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers kept (0: all)")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per GPU per step")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--head-alone", action="store_true")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--expect-world", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    results = []
    for patched in (False, True):
        results.append(run(args, patched, device))
        gc.collect()  # FSDP's hooks make reference cycles: free the first model before building the second
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ranks: list = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, results)
    if dist.get_rank() == 0:
        out = {"arch": args.arch, "layers": args.layers, "tokens_per_gpu": args.tokens, "dtype": args.dtype,
               "head_alone": args.head_alone, "world_size": dist.get_world_size(),
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "versions": {"torch": torch.__version__}, "date": time.strftime("%Y-%m-%d"), "ranks": ranks}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))
        for r in ranks[0]:
            print(("ours " if r["patched"] else "stock"), f"{r['step_ms_median']:.1f} ms/step", f"peak {r['peak_gib']} GiB",
                  "losses", [round(x, 4) for x in r["losses"]])
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
