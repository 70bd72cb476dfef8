"""``python -m cce_patch.bench.e2e`` / ``cce-patch e2e``: one training step of a real architecture, stock vs
patched with ``cce_patch.patch(model)``.

The model is built from its published config at random init (no downloads): Gemma-2-2B or Llama-3.2-1B (the
architecture facts of ../shared/ANCHORS.md), in bf16, with gradient checkpointing and SDPA attention (eager
where transformers refuses SDPA), on ``batch x seq`` random tokens (default 4 x 2048 = 8k tokens). The same
instance (same weights, same tokens) is measured stock, then patched, then unpatched, so the losses must agree
to bf16 rounding. Per variant: the loss
of the first step, the gradient norm, the peak memory of a forward+backward (absolute, and above the weights
and inputs), and the median step time. Outputs: ``<out>/<name>.json`` and ``<name>.md``.

Examples::

    python -m cce_patch.bench.e2e --model gemma2-2b --model llama3.2-1b      # on a GPU (the issue-3 numbers)
    python -m cce_patch.bench.e2e --model tiny-llama --batch 2 --seq 64      # seconds on a CPU
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..models.architectures import ARCHITECTURES, architecture_config
from .memory import free_cached, is_oom
from .report import environment, header_lines

log = logging.getLogger("cce_patch.bench")

def build_model(name: str, device: torch.device, dtype: torch.dtype, seed: int = 0, attn: str = "sdpa"):
    """Random-init model on ``device`` in ``dtype`` (created there directly), gradient checkpointing,
    attention ``attn`` — falling back to ``eager`` where transformers refuses it (recent versions refuse SDPA
    for Gemma 2, whose attention logit softcapping SDPA cannot apply).
    ``model.config._attn_implementation`` says which ran."""
    from transformers import AutoModelForCausalLM

    try:
        cfg = architecture_config(name)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    cfg.use_cache = False
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            try:
                torch.manual_seed(seed)
                model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
            except ValueError as exc:
                if attn == "eager":
                    raise
                log.warning(
                    "%s: attn_implementation=%r refused (%s); using 'eager'",
                    name,
                    attn,
                    str(exc).split(".")[0],
                )
                torch.manual_seed(seed)
                model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    finally:
        torch.set_default_dtype(old)
    model.to(device=device, dtype=dtype)
    # transformers >= 5.2x renamed it; older versions only have the first name.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def _patch_api() -> tuple[Callable, Callable]:
    import cce_patch

    patch = getattr(cce_patch, "patch", None)
    unpatch = getattr(cce_patch, "unpatch", None)
    if patch is None or unpatch is None:
        try:
            from cce_patch.models import patch, unpatch  # type: ignore[no-redef]
        except ImportError as exc:
            raise RuntimeError(f"cce_patch.patch / unpatch not available ({exc})") from None
    return patch, unpatch


@dataclass
class E2ERecord:
    model: str
    variant: str
    batch: int
    seq: int
    dtype: str
    attn: str = ""
    loss: float | None = None
    loss_rel_diff: float | None = None  # vs stock
    grad_norm: float | None = None
    grad_norm_rel_diff: float | None = None  # vs stock
    weights_gib: float | None = None
    peak_gib: float | None = None
    above_weights_gib: float | None = None
    step_ms: float | None = None
    status: str = "ok"
    options: dict = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_variant(
    model, ids, labels, rec: E2ERecord, device: torch.device, steps: int, warmup: int
) -> None:
    """First step: loss + gradient norm (+ peak memory on CUDA). Then ``warmup`` + ``steps`` timed steps."""

    def step(keep_grads: bool = False) -> torch.Tensor:
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        loss = out.loss.detach()
        del out
        if not keep_grads:
            model.zero_grad(set_to_none=True)
        return loss

    model.zero_grad(set_to_none=True)
    free_cached(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    loss = step(keep_grads=True)
    _sync(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        rec.peak_gib = peak / 2**30
        rec.above_weights_gib = (peak - before) / 2**30
    rec.loss = float(loss)
    sq = [p.grad.float().pow(2).sum() for p in model.parameters() if p.grad is not None]
    rec.grad_norm = float(torch.stack(sq).sum().sqrt()) if sq else 0.0
    model.zero_grad(set_to_none=True)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    rec.step_ms = statistics.median(times) if times else None


def run_model(
    name: str,
    variants: list[str],
    options: dict,
    device: torch.device,
    dtype: torch.dtype,
    batch: int,
    seq: int,
    steps: int,
    warmup: int,
    seed: int,
    attn: str = "sdpa",
) -> list[E2ERecord]:
    dtype_name = str(dtype).removeprefix("torch.")
    t0 = time.perf_counter()
    model = build_model(name, device, dtype, seed, attn)
    attn_used = getattr(model.config, "_attn_implementation", attn)
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    vocab = model.config.vocab_size
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    labels = ids.clone()
    labels[:, : max(1, seq // 16)] = -100  # a masked prompt, as in instruction tuning
    log.info("%s: %.2f GiB of weights built in %.1fs", name, weights, time.perf_counter() - t0)
    records: list[E2ERecord] = []
    stock: E2ERecord | None = None
    for variant in variants:
        rec = E2ERecord(
            name,
            variant,
            batch,
            seq,
            dtype_name,
            attn=attn_used,
            weights_gib=weights,
            options=options if variant == "patched" else {},
        )
        unpatch = None
        t1 = time.perf_counter()
        try:
            if variant == "patched":
                patch, unpatch = _patch_api()
                patch(model, **options)
            elif variant != "stock":
                raise ValueError(f"unknown variant {variant!r} (stock, patched)")
            measure_variant(model, ids, labels, rec, device, steps, warmup)
        except Exception as exc:  # noqa: BLE001 - recorded, the other variant still runs
            rec.status = "OOM" if is_oom(exc) else f"error: {type(exc).__name__}: {exc}"[:300]
            log.debug("variant %s failed", variant, exc_info=True)
        finally:
            if unpatch is not None:
                unpatch(model)
            model.zero_grad(set_to_none=True)
            free_cached(device)
        if variant == "stock" and rec.status == "ok":
            stock = rec
        elif stock is not None and rec.loss is not None:
            rec.loss_rel_diff = abs(rec.loss - stock.loss) / max(abs(stock.loss), 1e-12)
            rec.grad_norm_rel_diff = abs(rec.grad_norm - stock.grad_norm) / max(stock.grad_norm, 1e-12)
        log.info("  %-8s %s in %.1fs", variant, _brief(rec), time.perf_counter() - t1)
        records.append(rec)
    del model
    free_cached(device)
    return records


def _brief(r: E2ERecord) -> str:
    f = lambda x, p: "-" if x is None else f"{x:.{p}f}"  # noqa: E731
    return (
        f"loss {f(r.loss, 4)} (rel.diff {f(r.loss_rel_diff, 5)}), peak {f(r.peak_gib, 2)} GiB "
        f"({f(r.above_weights_gib, 2)} above weights+inputs), step {f(r.step_ms, 1)} ms, {r.status}"
    )


def markdown(records: list[E2ERecord], env: dict) -> str:
    f = lambda x, p: "-" if x is None else f"{x:.{p}f}"  # noqa: E731
    lines = header_lines(env)
    lines.append(
        "| model | variant | tokens | attn | loss | loss rel.diff | grad-norm rel.diff | peak GiB "
        "| GiB above weights | step ms | status |"
    )
    lines.append("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|")
    for r in records:
        lines.append(
            f"| {r.model} | {r.variant} | {r.batch}x{r.seq} | {r.attn} | {f(r.loss, 4)} "
            f"| {f(r.loss_rel_diff, 5)} | {f(r.grad_norm_rel_diff, 4)} | {f(r.peak_gib, 2)} "
            f"| {f(r.above_weights_gib, 2)} | {f(r.step_ms, 1)} | {r.status} |"
        )
    return "\n".join(lines) + "\n"


def _parse_options(items: list[str]) -> dict:
    import ast

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
    p = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument(
        "--model",
        action="append",
        choices=sorted(ARCHITECTURES),
        default=None,
        help="repeatable; default gemma2-2b and llama3.2-1b on CUDA, tiny-llama on CPU",
    )
    p.add_argument("--variants", default="stock,patched")
    p.add_argument(
        "--patch-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="passed to cce_patch.patch(model, **options), e.g. impl=triton",
    )
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="default bf16 (CUDA), fp32 (CPU)"
    )
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attn", default="sdpa", help="attn_implementation (falls back to eager where refused)")
    p.add_argument("--tol", type=float, default=1e-2, help="loss rel.diff that counts as agreement (bf16)")
    p.add_argument("--out", type=Path, default=Path("outputs/bench"))
    p.add_argument("--name", default="e2e")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    ]
    models = args.model or (["gemma2-2b", "llama3.2-1b"] if device.type == "cuda" else ["tiny-llama"])
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    options = _parse_options(args.patch_option)
    env = environment(device, [*prog.split(), *argv])
    records: list[E2ERecord] = []
    for name in models:
        records += run_model(
            name,
            variants,
            options,
            device,
            dtype,
            args.batch,
            args.seq,
            args.steps,
            args.warmup,
            args.seed,
            args.attn,
        )
    agree = all(r.loss_rel_diff is None or r.loss_rel_diff <= args.tol for r in records)
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(records, env)
    (args.out / f"{args.name}.md").write_text(table)
    (args.out / f"{args.name}.json").write_text(
        json.dumps(
            {
                "environment": env,
                "config": {**vars(args), "out": str(args.out), "models": models, "tol": args.tol},
                "losses_agree": agree,
                "results": [asdict(r) for r in records],
            },
            indent=1,
            default=str,
        )
        + "\n"
    )
    print(table)
    print(f"losses agree within {args.tol}: {agree}; wrote {args.out / (args.name + '.json')}")
    return 0 if all(r.status == "ok" for r in records) and agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
