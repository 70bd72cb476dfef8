"""Gradient filtering on a trained model's own logits: train briefly on the Alpaca sample, then measure (issue 23).

    python -m cce_patch.bench.filter_trained --arch qwen2.5-0.5b --data .gpu_data/alpaca_5000.json \\
        --tokenizer .gpu_data/tokenizers/qwen2.5 --minutes 3 --out outputs/filter

Why: the synthetic regimes (``regimes.py``) guess what trained logits look like; what the filter skips, and what
it costs in gradient error, should also be measured on logits a real architecture produced after training on
real text. This builds the architecture ``--arch`` (``models/architectures.py``, random init, fp32 weights), patches
it (``cce_patch.patch``, exact gradients), trains it with plain AdamW under ``--dtype`` autocast (as the recipe's
Trainer does with ``bf16: true``: pure bf16 weights under AdamW diverged to NaN after ~470 steps at lr 5e-4 on an
H100) on the Alpaca rows (tokenized by the recipe's own code, ``recipes/alpaca_prompts.py``: the Alpaca prompt,
response-only labels) for ``--minutes`` or ``--steps``, then runs the base model on held-out rows (never trained
on) and keeps, for ``--n`` response tokens, the final hidden states (after the last norm, as the head sees them),
the head's weight and the next-token targets, in ``--dtype``. A step whose loss is not finite stops the run
with an error (a measurement on NaN hidden states would be meaningless), as do non-finite captured states.
On that problem it measures exactly what ``filter_bench.py`` measures (exact methods, filter_eps in each
mode: time, peak MB, dE/dC error against fp32, tiles skipped, the backend that ran) and writes rows of the same
JSON format, with regime ``trained-<arch>-<steps>steps``, so one report shows them beside the synthetic regimes.
``--save FILE`` also keeps the captured (e, c, t) for later CPU analysis (large: ~N*D + V*D bf16 numbers).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

from .filter_bench import add_ratios, common_parser, exact_specs, finish, measure_problem, write_json
from .memory import free_cached
from .report import environment

log = logging.getLogger("cce_patch.bench")
RECIPES = Path(__file__).resolve().parents[2] / "recipes"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def alpaca_prompts() -> ModuleType:
    """The recipe's Alpaca code (``recipes/alpaca_prompts.py``), so the tokens are the ones the recipe trains on.
    It lives beside the package in a checkout, not inside it: loaded by path."""
    path = RECIPES / "alpaca_prompts.py"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found: run from a checkout of the repository (the recipes/ folder)")
    spec = importlib.util.spec_from_file_location("alpaca_prompts", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_model(arch: str, vocab_needed: int, dtype: torch.dtype, device: torch.device, seed: int):
    """The architecture at random init, weights in ``dtype``; its vocabulary grown to the tokenizer's where
    smaller (tiny presets)."""
    from transformers import AutoModelForCausalLM

    from ..models.architectures import architecture_config

    config = architecture_config(arch)
    if getattr(config, "final_logit_softcapping", None):
        raise SystemExit(f"error: {arch} soft-caps its logits; this measurement is of the plain head (no softcap)")
    if vocab_needed > config.vocab_size:
        log.info("%s: vocabulary %d grown to the tokenizer's %d", arch, config.vocab_size, vocab_needed)
        config = architecture_config(arch, vocab_size=vocab_needed)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    return model


def batches(examples: list[dict], batch: int, collate, seed: int):
    """Endless shuffled batches (a new order every epoch)."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order) - batch + 1, batch):
            yield collate([examples[i] for i in order[start:start + batch]])


def train(model, examples: list[dict], collate, args, device: torch.device) -> dict:
    """Plain AdamW (linear warm-up) on the patched model until ``--steps`` or ``--minutes``; the loss curve."""
    import cce_patch

    cce_patch.patch(model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, args.warmup_steps)))
    budget_s = args.minutes * 60
    compute = DTYPES[args.dtype]
    t0 = time.perf_counter()
    curve, step, tokens = [], 0, 0
    for batch in batches(examples, args.batch, collate, args.seed):
        if (args.steps and step >= args.steps) or (not args.steps and time.perf_counter() - t0 >= budget_s):
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=compute, enabled=compute != torch.float32):
            loss = model(**batch).loss
        value = float(loss.detach())  # one read per step: a diverged run must stop here, not be measured
        if not math.isfinite(value):
            raise SystemExit(f"error: training diverged at step {step + 1} (loss {value}); lower --lr "
                             f"(now {args.lr:g}) or train fewer steps")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens += int((batch["labels"] != -100).sum())
        if step % args.log_every == 0 or step == 1:
            curve.append((step, value))
            log.info("step %d loss %.4f (%.0f s)", step, curve[-1][1], time.perf_counter() - t0)
    if step and curve[-1][0] != step:
        curve.append((step, value))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"steps": step, "train_s": round(time.perf_counter() - t0, 1), "response_tokens": tokens, "loss_curve": curve}


@torch.no_grad()
def capture(model, examples: list[dict], collate, n: int, batch: int, device: torch.device, dtype: torch.dtype):
    """(e, c, t): the final hidden states of ``n`` response tokens (label != -100 after the causal shift), the
    head's weight and their next-token targets, from the base model (the head's input), in ``dtype`` (the base
    model runs under its autocast, as in training)."""
    model.eval()
    base = getattr(model, model.base_model_prefix)
    es, ts, have = [], [], 0
    for start in range(0, len(examples), batch):
        b = {k: v.to(device) for k, v in collate(examples[start:start + batch]).items()}
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            hidden = base(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        targets = b["labels"][:, 1:]
        keep = targets != -100
        es.append(hidden[:, :-1][keep])
        ts.append(targets[keep])
        have += int(keep.sum())
        if have >= n:
            break
    if have < n:
        log.warning("held-out rows give %d response tokens, fewer than --n %d: measuring on %d", have, n, have)
    e = torch.cat(es)[:n].to(dtype).contiguous()
    t = torch.cat(ts)[:n].contiguous()
    c = model.get_output_embeddings().weight.detach().to(dtype).contiguous()
    if not (torch.isfinite(e).all() and torch.isfinite(c).all()):
        raise SystemExit("error: the trained model's hidden states or head weight are not finite; nothing to measure")
    return e, c, t


def main(argv: Sequence[str] | None = None) -> int:
    p = common_parser(__doc__.split("\n")[0])
    p.add_argument("--arch", default="qwen2.5-0.5b", help="an architecture preset (models/architectures.py)")
    p.add_argument("--data", type=Path, default=Path(".gpu_data/alpaca_5000.json"), help="Alpaca rows (JSON/JSONL)")
    p.add_argument("--tokenizer", default=".gpu_data/tokenizers/qwen2.5", help="a tokenizer directory")
    p.add_argument("--minutes", type=float, default=3.0, help="training time (ignored with --steps)")
    p.add_argument("--steps", type=int, default=0, help="training steps (0: train for --minutes)")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--holdout", type=int, default=512, help="rows kept out of training, for the capture")
    p.add_argument("--max-rows", type=int, default=0, help="use only the first rows of --data (0: all)")
    p.add_argument("--n", type=int, default=8192, help="response tokens captured")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                   help="autocast dtype of training and the dtype of the measured problem (weights stay fp32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", type=Path, default=None, help="also torch.save the captured {e, c, t} here")
    p.add_argument("--name", default="filter_trained")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    device = torch.device(args.device)
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq

    prompts = alpaca_prompts()
    rows = prompts.load_local_rows(args.data)
    if args.max_rows:
        rows = rows[: args.max_rows]
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    examples = [ex for ex in prompts.tokenize_rows(rows, tokenizer, args.max_length)
                if any(label != -100 for label in ex["labels"][1:])]
    random.Random(args.seed).shuffle(examples)
    if len(examples) <= args.holdout + args.batch:
        raise SystemExit(f"error: {len(examples)} usable rows: need more than --holdout {args.holdout} + --batch")
    held_out, train_rows = examples[: args.holdout], examples[args.holdout:]
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, pad_to_multiple_of=8,
                                     return_tensors="pt")
    model = build_model(args.arch, len(tokenizer), torch.float32, device, args.seed)
    log.info("%s: %.1fM parameters, %d training rows, %d held out", args.arch,
             sum(q.numel() for q in model.parameters()) / 1e6, len(train_rows), len(held_out))
    trained = train(model, train_rows, collate, args, device)
    e, c, t = capture(model, held_out, collate, args.n, args.batch, device, DTYPES[args.dtype])
    del model
    free_cached(device)
    if args.save is not None:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"e": e.cpu(), "c": c.cpu(), "t": t.cpu(), "arch": args.arch, **trained}, args.save)
        log.info("saved the captured problem to %s", args.save)
    regime = f"trained-{args.arch}-{trained['steps']}steps"
    env = environment(device)
    config = {"shape": f"N={e.shape[0]} D={e.shape[1]} V={c.shape[0]} {args.dtype}", "eps": args.eps,
              "vocab_order": args.vocab_order, "rep_ms": args.rep_ms, "regime": regime, "arch": args.arch,
              "data": str(args.data), "tokenizer": str(args.tokenizer), "batch": args.batch, "lr": args.lr,
              **trained}
    rows_out: list[dict] = []
    path = args.out / f"{args.name}.json"

    def checkpoint(row: dict) -> None:
        rows_out.append(row)
        write_json(path, env, config, rows_out)

    measure_problem(e, c, t, regime, exact=exact_specs(args, device), eps_values=args.eps,
                    filter_modes=[m for m in args.filter_modes.split(",") if m], vocab_orders=args.vocab_order or [None],
                    warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, cpu_repeats=args.cpu_repeats, on_row=checkpoint)
    add_ratios(rows_out)
    curve = trained["loss_curve"]
    print(f"trained {args.arch} {trained['steps']} steps in {trained['train_s']} s" +
          (f": loss {curve[0][1]:.3f} -> {curve[-1][1]:.3f}" if curve else ""))
    finish(rows_out, env, config, args.out, args.name, not args.no_png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
