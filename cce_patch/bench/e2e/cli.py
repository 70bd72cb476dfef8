"""``python -m cce_patch.bench.e2e`` / ``cce-patch e2e``: one training step of a real architecture, stock vs
patched with ``cce_patch.patch(model)`` (and Liger-Kernel, with ``--with-liger-kernels``).

The model is built from its published config at random init (no downloads; presets in
``cce_patch/models/architectures.py``), in bf16, with gradient checkpointing and SDPA attention (eager where
transformers refuses SDPA), on ``batch x seq`` random tokens (default 4 x 2048 = 8k tokens). The same instance
(same weights, same tokens) runs every variant in turn, so the losses must agree to bf16 rounding. Per
variant: the loss of the first step, the gradient norm, the peak memory of a forward+backward (absolute, and
above the weights and inputs), the median step time and, with ``--max-tokens``, the largest tokens per step
that fit. ``--compile`` runs the variants under torch.compile (and reports the graph breaks of one forward);
``--loop-steps N`` adds the Trainer-loop mode (``loop.py``: N AdamW steps over variable-length padded batches).
Outputs: ``<out>/<name>.json``, ``<name>.md`` and ``<name>.png``.

Examples::

    cce-patch e2e --model gemma2-2b --model llama3.2-1b                    # stock vs ours (on a GPU)
    cce-patch e2e --model gemma2-2b --model llama3.1-8b --with-liger-kernels --max-tokens
    cce-patch e2e --model gemma2-2b --variants 'stock,ours[mode=memory],ours[mode=speed],ours'
    cce-patch e2e --model tiny-llama --batch 2 --seq 64                    # seconds on a CPU
    cce-patch e2e --model gemma2-2b --with-liger-kernels --compile both --loop-steps 60   # the Trainer-loop table
"""

from __future__ import annotations

import argparse
import ast
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from ...models.architectures import ARCHITECTURES
from ..report import environment
from .build import VARIANTS, liger_available, parse_variant
from .loop import LoopConfig
from .max_tokens import SearchConfig
from .measure import E2ERecord, run_model
from .report import markdown, plot, write_json

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", action="append", choices=sorted(ARCHITECTURES), default=None,
                   help="repeatable; default gemma2-2b and llama3.2-1b on CUDA, tiny-llama on CPU")
    p.add_argument("--variants", default=None,
                   help=f"comma-separated, from {', '.join(VARIANTS)} ('patched' = ours); ours and ours+liger take "
                   "options, e.g. 'ours[mode=speed]'. Default: stock,ours (with --with-liger-kernels: all four)")
    p.add_argument("--with-liger-kernels", action="store_true",
                   help="add Liger-Kernel's variants: liger (all its kernels, its fused loss included) and "
                   "ours+liger (its RMSNorm/SwiGLU/GeGLU/RoPE kernels with our loss); needs `pip install "
                   "liger-kernel` and a CUDA device")
    p.add_argument("--patch-option", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to cce_patch.patch(model, **options) by the ours variants, e.g. mode=speed")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-tokens", action="store_true",
                   help="also search the largest tokens per step that fit in memory, per variant (batch x seq at "
                   "a fixed seq; each probe is one training step)")
    p.add_argument("--max-tokens-cap", type=int, default=131072, help="tokens per step the search stops at")
    p.add_argument("--max-tokens-seq", type=int, default=None, help="sequence length of the search (default --seq)")
    p.add_argument("--max-tokens-budget-s", type=float, default=60.0, help="seconds of probes per variant")
    p.add_argument("--max-memory-gib", type=float, default=None,
                   help="cap this process's CUDA memory (torch.cuda.set_per_process_memory_fraction), e.g. 80 to "
                   "answer for an 80 GB card")
    p.add_argument("--compile", nargs="?", const="on", default="off", choices=("off", "on", "both"),
                   help="run the model under torch.compile, as TrainingArguments(torch_compile=True) does: 'on' "
                   "(or the bare flag) for every variant, 'both' for each variant eager and compiled "
                   "(<variant>+compile); compiled variants report their graph breaks")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (e.g. aot_eager on CPU)")
    p.add_argument("--loop-steps", type=int, default=0,
                   help="Trainer-loop mode: N AdamW steps per variant over variable-length padded batches with "
                   "masked prompts (0: off); reports first-step and median step time, tokens/s, peak, losses")
    p.add_argument("--loop-warmup", type=int, default=10, help="loop steps left out of the median and tokens/s")
    p.add_argument("--loop-batch", type=int, default=16, help="sequences per loop step")
    p.add_argument("--loop-len", default="32-512", help="MIN-MAX tokens per loop sequence")
    p.add_argument("--lr", type=float, default=1e-5, help="the loop's AdamW learning rate")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 (CUDA), fp32 (CPU)")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attn", default="sdpa", help="attn_implementation (falls back to eager where refused)")
    p.add_argument("--tol", type=float, default=1e-2, help="loss rel.diff that counts as agreement (bf16)")
    p.add_argument("--out", type=Path, default=Path("outputs/bench"))
    p.add_argument("--name", default="e2e")
    p.add_argument("--no-png", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _parse_options(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --patch-option {item!r}: expected key=value")
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out


def main(argv: Sequence[str] | None = None, prog: str = "python -m cce_patch.bench.e2e") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    models = args.model or (["gemma2-2b", "llama3.2-1b"] if device.type == "cuda" else ["tiny-llama"])
    if args.with_liger_kernels and not liger_available():
        raise SystemExit("error: --with-liger-kernels needs Liger-Kernel: pip install liger-kernel")
    default_variants = "stock,ours,liger,ours+liger" if args.with_liger_kernels else "stock,ours"
    options = _parse_options(args.patch_option)
    try:
        variants = [parse_variant(v, options) for v in (args.variants or default_variants).split(",") if v.strip()]
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    search = None
    limit = None
    if args.max_memory_gib is not None:
        if device.type != "cuda":
            raise SystemExit("error: --max-memory-gib caps CUDA memory; there is no CUDA device here")
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.max_memory_gib * 2**30 / total), device)
        limit = int(args.max_memory_gib * 2**30)
    if args.max_tokens:
        search = SearchConfig(cap_tokens=args.max_tokens_cap, budget_s=args.max_tokens_budget_s,
                              seq=args.max_tokens_seq, memory_limit_bytes=limit)
    loop = None
    if args.loop_steps:
        try:
            low, high = (int(x) for x in args.loop_len.split("-"))
        except ValueError:
            raise SystemExit(f"error: --loop-len {args.loop_len!r}: expected MIN-MAX, e.g. 32-512") from None
        loop = LoopConfig(steps=args.loop_steps, warmup=args.loop_warmup, batch=args.loop_batch, min_len=low,
                          max_len=high, lr=args.lr, seed=args.seed)
    env = environment(device, [*prog.split(), *argv])
    records: list[E2ERecord] = []
    for name in models:
        records += run_model(name, variants, device, dtype, args.batch, args.seq, args.steps, args.warmup,
                             args.seed, args.attn, search, loop, args.compile, args.compile_backend)
    agree = all(r.loss_rel_diff is None or r.loss_rel_diff <= args.tol for r in records)
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(records, env)
    (args.out / f"{args.name}.md").write_text(table)
    config = {**vars(args), "out": str(args.out), "models": models, "variants": [v.label for v in variants],
              "tol": args.tol}
    write_json(args.out / f"{args.name}.json", env, config, records, agree)
    wrote = [args.out / f"{args.name}.json", args.out / f"{args.name}.md"]
    if not args.no_png and plot(records, env, args.out / f"{args.name}.png"):
        wrote.append(args.out / f"{args.name}.png")
    print(table)
    print(f"losses agree within {args.tol}: {agree}; wrote {', '.join(str(p) for p in wrote)}")
    ok = all(r.status == "ok" or r.status.startswith("skipped") for r in records)
    return 0 if ok and agree else 1
