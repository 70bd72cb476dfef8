"""The paper's fine-tuning experiment per family, through the shipped recipe: each family's YAML as shipped
(LoRA, batch, length, gradient checkpointing), its real architecture at random init (``--model_config``: no
weights can be downloaded), the real Alpaca sample and tokenizer, N optimizer steps, through
``accelerate launch``, once per arm:

    stock                      --use_cce false
    use_cce                    --use_cce true
    torch_compile              --use_cce false --torch_compile true     (the paper's control)
    use_cce+torch_compile      --use_cce true  --torch_compile true
    use_liger_kernel           --use_cce false --use_liger_kernel true  (all of Liger's kernels, its loss too)
    use_cce+use_liger_kernel   --use_cce true  --use_liger_kernel true  (Liger's decoder kernels, our loss)

    python recipes/family_runs.py --family gemma2-2b --data .gpu_data --out $OUT            # six arms, 200 steps
    python recipes/family_runs.py --family phi3.5-mini --arms stock,use_cce --steps 200 --full
    python recipes/family_runs.py --dry-run --out /tmp/fam                                  # CPU plumbing, tiny

Each arm runs ``timed_finetune.py`` (the recipe plus a per-step log) in its own process; its step log
``<out>/<family>/<arm>.steps.jsonl`` grows as it trains and ends with the command and exit code, and after every
arm the family's ``<out>/<family>.json / .md / .png`` are rewritten from what exists
(``family_report.py``), so a run cut short still leaves its rows. Arms of one family belong on one machine in
one session; ``python recipes/family_report.py DIR1 DIR2 ...`` merges arms that ran in several calls.

Overrides of the YAML, all said in ``meta.json``: the model (``--model_name_or_path ''`` and the family's
``--model_config``), the tokenizer and data (from ``--data``), ``--max_steps``, ``--logging_steps 1``, no saving
and no evaluation (a benchmark of training), ``--include_num_input_tokens_seen`` (tokens/s). A family whose
tokenizer is not in ``--data`` uses another family's (said in the output and meta.json): the model keeps its own
vocabulary, so the head and the loss are the family's; one without a chat template where the YAML asks for it
(the shared Llama 3.1 tokenizer) trains on the Alpaca prompt format instead, said likewise. ``--full`` also runs
full fine-tuning (``--lora_r 0``) for
the families whose YAML is LoRA and that fit one 80 GB GPU with AdamW (Phi 3.5; Gemma 2 2B's YAML is already full
fine-tuning), as the family ``<family>-full``. ``--dry-run``: a tiny version of each family's architecture (its
vocabulary kept, 2 layers of width 64), 3 steps of 2 sequences of at most 64 tokens, on CPU, arms stock and
use_cce: the plumbing, in about a minute per family.

The largest batch (issue 22's last row), instead of the timed runs:

    python recipes/family_runs.py --family gemma2-2b --max-batch --arms stock,use_cce --data .gpu_data --out $OUT
    python recipes/family_runs.py --dry-run --max-batch --family qwen2.5-7b --max-batch-limit 2 --out /tmp/fam

measures, per arm, the largest ``per_device_train_batch_size`` that trains without a CUDA out-of-memory error at
the YAML's ``max_length``, every batch the worst case: rows of exactly ``max_length`` real Alpaca tokens (the
recipe's ``--full_length_rows``: examples concatenated, no padding, the recipe's labels; the recipe itself pads
to the batch's longest example, ~100-300 tokens on Alpaca), everything else as the YAML ships it (gradient
accumulation, checkpointing, LoRA or full, bf16) and as the arm sets it. Each candidate batch is
``--max-batch-steps`` (2) optimizer steps of the recipe in its own ``accelerate launch`` process; the batch
doubles from the YAML's batch while it fits, then the bracket is bisected (``max_batch.py`` says how an OOM is
told from a crash: a crash or a candidate over ``--max-batch-timeout`` stops that arm's search, reported as a
lower bound). Results go to ``<out>/<family>/max_batch.jsonl`` as each candidate ends, and the family's report
gets a "largest per-device batch" table (largest batch, its peak memory, the smallest that ran out of memory,
what ended the search, the ratio to stock's). ``--dry-run`` needs ``--max-batch-limit N``: on CPU nothing runs
out of CUDA memory, and reaching the cap is reported as the cap. ``--full`` / ``--full-only`` work as above.

Device time, estimated from the steps (not yet measured on the device): a candidate costs the process start and
the random init of the model (~30-60 s for Gemma 2 2B) plus 2 optimizer steps of ``batch x 4 x 1024`` tokens
(about 6 x 2.6e9 x 4/3 FLOP per token with checkpointing, ~40% of an H100's bf16 peak: ~0.2 s per sequence of
1024, plus the head's 2 x 1024 x 2304 x 256000 x 3 FLOP), so ~45-70 s at batch 8-64; a search takes
``log2(largest / 8)`` doublings plus ``log2`` of the bracket bisections (stock: ~5 candidates, use_cce: ~8-9;
``--max-batch-tolerance 0.125`` stops ~3 bisections earlier): ~5 and ~9 minutes, one arm per 10-minute call.
"""


from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import family_report  # noqa: E402
import max_batch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ARMS: dict[str, list[str]] = {
    "stock": ["--use_cce", "false"],
    "use_cce": ["--use_cce", "true"],
    "torch_compile": ["--use_cce", "false", "--torch_compile", "true"],
    "use_cce+torch_compile": ["--use_cce", "true", "--torch_compile", "true"],
    "use_liger_kernel": ["--use_cce", "false", "--use_liger_kernel", "true"],
    "use_cce+use_liger_kernel": ["--use_cce", "true", "--use_liger_kernel", "true"],
}
CPU_ARMS = ("stock", "use_cce")


@dataclass(frozen=True)
class Family:
    """A shipped YAML and what stands in for its hub model: an architecture (preset name or config.json) and the
    tokenizers to try, in order (the family's own first)."""

    yaml: str
    architecture: str
    tokenizers: tuple[str, ...]
    full_fine_tune: str  # "yaml" (the YAML already trains all weights), "option" (--full adds it), "no"


FAMILIES: dict[str, Family] = {
    "gemma2-2b": Family("configs/gemma2-2b.yaml", "gemma2-2b", ("gemma2", "llama3.1", "qwen2.5"), "yaml"),
    "phi3.5-mini": Family("configs/phi3.5-mini.yaml", "configs/architectures/phi3.5-mini.json",
                          ("phi3-mini",), "option"),
    "qwen2.5-7b": Family("configs/qwen2.5-7b.yaml", "qwen2.5-7b", ("qwen2.5",), "no"),
    "llama3.1-8b": Family("configs/llama3.1-8b.yaml", "llama3.1-8b", ("llama3.1",), "no"),
    "mistral-nemo-12b": Family("configs/mistral-nemo-12b.yaml", "configs/architectures/mistral-nemo-12b.json",
                               ("mistral-nemo", "llama3.1"), "no"),
}


def pick_tokenizer(family: Family, data: Path) -> tuple[Path, str | None]:
    """The family's tokenizer under ``data/tokenizers``, else the first stand-in there that fits the model's
    vocabulary; with a note when it is a stand-in."""
    for i, name in enumerate(family.tokenizers):
        path = data / "tokenizers" / name
        if (path / "tokenizer.json").is_file():
            note = None if i == 0 else (f"tokenizer: {family.tokenizers[0]} is not in {data / 'tokenizers'}; "
                                        f"using {name}'s (the model keeps its own vocabulary)")
            return path, note
    raise SystemExit(f"error: none of the tokenizers {family.tokenizers} is in {data / 'tokenizers'}")


def has_chat_template(tokenizer: Path) -> bool:
    """Whether the tokenizer directory carries a chat template (``tokenizer_config.json`` or a ``.jinja`` file);
    the shared Llama 3.1 tokenizer has none."""
    config = tokenizer / "tokenizer_config.json"
    if config.is_file() and json.loads(config.read_text()).get("chat_template"):
        return True
    return any(tokenizer.glob("*.jinja"))


def chat_template_override(family: Family, tokenizer: Path) -> tuple[list[str], str | None]:
    """``--use_chat_template false`` (and why) where the YAML asks for the chat template and the tokenizer has
    none: the Alpaca prompt instead, the same tokens for every arm."""
    import yaml

    wants = bool((yaml.safe_load((ROOT / family.yaml).read_text()) or {}).get("use_chat_template"))
    if wants and not has_chat_template(tokenizer):
        return ["--use_chat_template", "false"], (f"use_chat_template: the {tokenizer.name} tokenizer carried has no "
                                                  "chat template; the Alpaca prompt format instead")
    return [], None


def architecture_arg(family: Family) -> str:
    """``--model_config``: a preset name as is, a config.json as a path from the repository root."""
    return str(ROOT / family.architecture) if family.architecture.endswith(".json") else family.architecture


def tiny_config(family: Family, out: Path) -> Path:
    """The family's architecture shrunk to 2 layers of width 64 (vocabulary, head and model type kept), as a
    config.json the recipe's ``--model_config`` reads: the dry run's model."""
    from transformers import AutoConfig

    sys.path.insert(0, str(ROOT))
    if family.architecture.endswith(".json"):
        config = AutoConfig.from_pretrained(str(ROOT / family.architecture))
    else:
        from cce_patch.models.architectures import architecture_config

        config = architecture_config(family.architecture)
    shrink = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16)
    for key, value in shrink.items():
        setattr(config, key, value)
    if getattr(config, "query_pre_attn_scalar", None):
        config.query_pre_attn_scalar = 16
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:2]
    path = out / "config.json"
    out.mkdir(parents=True, exist_ok=True)
    config.to_json_file(str(path))
    return path


def arm_command(args: argparse.Namespace, name: str, family: Family, arm: str, model_config: str,
                tokenizer: Path, log: Path, full: bool, output_dir: Path | None = None) -> list[str]:
    accelerate = ROOT / "configs" / "accelerate" / ("cpu.yaml" if args.dry_run else "single-gpu.yaml")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate),
           str(ROOT / "recipes" / "timed_finetune.py"), "--step_log", str(log), str(ROOT / family.yaml),
           "--model_name_or_path", "", "--model_config", model_config, "--tokenizer_name_or_path", str(tokenizer),
           "--dataset_path", str(args.data / "alpaca_5000.json"), "--max_steps", str(args.steps),
           "--logging_steps", "1", "--save_strategy", "no", "--save_final_model", "false", "--eval_strategy", "no",
           "--eval_fraction", "0",
           "--include_num_input_tokens_seen", "true", "--output_dir", str(output_dir or args.scratch / name / arm),
           "--report_to", "none", "--seed", str(args.seed), *ARMS[arm]]
    if full:
        cmd += ["--lora_r", "0"]
    if args.dry_run:
        cmd += ["--max_length", "64", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
                "--max_examples", "32", "--bf16", "false", "--use_cpu", "true", "--gradient_checkpointing", "false"]
    return cmd + args.extra


def family_setup(args: argparse.Namespace, name: str, family: Family, full: bool) -> dict:
    """What every run of one family shares: its label and output folder, the tokenizer (and the notes on a
    stand-in or a missing chat template), the recipe flags that follow from them, the model config, and meta."""
    label = f"{name}-full" if full else name
    out = args.out / label
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, note = pick_tokenizer(family, args.data)
    template_flags, template_note = chat_template_override(family, tokenizer)
    note = "; ".join(filter(None, [note, template_note])) or None
    model_config = str(tiny_config(family, args.scratch / label / "tiny")) if args.dry_run else architecture_arg(family)
    meta = {"yaml": family.yaml, "model_config": family.architecture + (" (shrunk: dry run)" if args.dry_run else ""),
            "tokenizer": tokenizer.name, "notes": note or "-", "steps": args.steps,
            "full_fine_tune": full or family.full_fine_tune == "yaml",
            "overrides": "model from --model_config at random init, --logging_steps 1, no saving or evaluation, "
                         "--include_num_input_tokens_seen" + (", --lora_r 0" if full else "")
                         + (", dry run: tiny sizes on CPU" if args.dry_run else ""),
            "skip": args.skip, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if note:
        print(f"[{label}] {note}", flush=True)
    return {"label": label, "out": out, "tokenizer": tokenizer, "template_flags": template_flags,
            "model_config": model_config, "meta": meta}


def child_env() -> dict[str, str]:
    """The recipe's environment: this one, with the repository on ``PYTHONPATH`` (``cce_patch`` importable)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def rewrite_report(args: argparse.Namespace, label: str, meta: dict) -> list[Path]:
    """The family's JSON / table / plot from everything under ``--out`` now: the arms' step logs and the
    largest-batch probe's results."""
    arms = family_report.collect([args.out]).get(label, {})
    largest = family_report.collect_max_batch([args.out]).get(label, {})
    return family_report.write_family(args.out, label, arms, meta, largest)


def run_family(args: argparse.Namespace, name: str, family: Family, full: bool = False) -> list:
    """Every arm of one family in turn; their exit codes (0, a code, or "timeout")."""
    setup = family_setup(args, name, family, full)
    label, out, tokenizer, template_flags = setup["label"], setup["out"], setup["tokenizer"], setup["template_flags"]
    model_config, meta = setup["model_config"], setup["meta"]
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    codes = []
    for arm in args.arms:
        log = out / f"{arm}.steps.jsonl"
        log.unlink(missing_ok=True)
        cmd = arm_command(args, label, family, arm, model_config, tokenizer, log, full) + template_flags
        print(f"[{label}] {arm}: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=child_env(), timeout=args.arm_timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        codes.append(rc)
        record = {"arm": arm, "command": cmd, "rc": rc, "seconds": round(time.perf_counter() - t0, 1)}
        with log.open("a") as f:  # the run's record closes its step log: one file per arm comes back
            f.write(json.dumps({"run": record}) + "\n")
        written = rewrite_report(args, label, meta)
        print(f"[{label}] {arm}: rc {rc} in {record['seconds']} s; wrote {', '.join(p.name for p in written)}",
              flush=True)
    print(family_report.markdown(label, family_report.family_report(family_report.collect([args.out])[label]), meta,
                                 family_report.collect_max_batch([args.out]).get(label)))
    return codes


def recipe_value(command: list[str], flag: str, yaml_path: Path, default: int) -> int:
    """The value the recipe will see for ``flag``: its last occurrence in ``command`` (argparse keeps the last),
    else the YAML's, else ``default`` (the recipe's own)."""
    import yaml

    for i in range(len(command) - 2, -1, -1):
        if command[i] == flag:
            return int(command[i + 1])
    raw = yaml.safe_load(yaml_path.read_text()) or {}
    return int(raw.get(flag.removeprefix("--"), default))


def max_batch_family(args: argparse.Namespace, name: str, family: Family, full: bool = False) -> list:
    """The largest-batch probe (``max_batch.py``) for every arm of one family in turn, into
    ``<out>/<family>/max_batch.jsonl``; the report is rewritten after each candidate. Returns 0 per arm whose
    search ended at an OOM bracket, the cap or batch 1's OOM, 1 for one that a failure or a time limit ended."""
    setup = family_setup(args, name, family, full)
    label, out, tokenizer, template_flags = setup["label"], setup["out"], setup["tokenizer"], setup["template_flags"]
    meta = {k: v for k, v in setup["meta"].items() if k not in ("steps", "skip")}
    meta["overrides"] += ("; --max-batch: --full_length_rows, per_device_train_batch_size searched, "
                          f"--max_steps {args.max_batch_steps}")
    meta_path = out / "meta.json"
    if meta_path.is_file():  # the arms' runs wrote it: theirs is the fuller one (steps, skip)
        meta = json.loads(meta_path.read_text())
    else:
        meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    results = out / "max_batch.jsonl"
    work = args.scratch / label / "max_batch"
    codes = []
    for arm in args.arms:
        def base_command(step_log: Path, arm: str = arm) -> list[str]:
            return arm_command(args, label, family, arm, setup["model_config"], tokenizer, step_log, full,
                               output_dir=work / arm) + template_flags

        def command_for(batch: int, arm: str = arm) -> tuple[list[str], Path]:
            step_log = work / f"{arm}.b{batch}.steps.jsonl"
            return base_command(step_log) + ["--per_device_train_batch_size", str(batch), "--max_steps",
                                             str(args.max_batch_steps), "--full_length_rows", "true"], step_log

        base = base_command(work / "unused.jsonl")  # what the recipe sees before the probe's overrides
        start = args.max_batch_start or recipe_value(base, "--per_device_train_batch_size", ROOT / family.yaml, 8)
        length = recipe_value(base, "--max_length", ROOT / family.yaml, 512)
        accumulation = recipe_value(base, "--gradient_accumulation_steps", ROOT / family.yaml, 1)
        header = {"family": label, "yaml": family.yaml, "max_length": length,
                  "gradient_accumulation_steps": accumulation, "steps": args.max_batch_steps,
                  "start": start, "limit": args.max_batch_limit, "rel_tol": args.max_batch_tolerance,
                  "timeout_s": args.max_batch_timeout, "dry_run": args.dry_run, "device": device_name(),
                  "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
                  "measured": f"per_device_train_batch_size at max_length {length}: rows of exactly {length} "
                              "Alpaca tokens (--full_length_rows: examples concatenated, no padding, the recipe's "
                              f"labels), gradient accumulation {accumulation}, {args.max_batch_steps} optimizer "
                              "steps per candidate in its own process; does not fit = CUDA out of memory only",
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        print(f"[{label}] max-batch {arm}: {header['measured']}", flush=True)
        result = max_batch.probe_arm(
            command_for, results, arm, header, args.max_batch_steps, accumulation * length, work,
            start=start, limit=args.max_batch_limit, rel_tol=args.max_batch_tolerance,
            timeout=args.max_batch_timeout, env=child_env(), cwd=ROOT,
            on_candidate=lambda: rewrite_report(args, label, meta))
        print(f"[{label}] max-batch {arm}: largest {result.largest} (ended by {result.bound}"
              + (f": {result.detail}" if result.detail else "") + ")", flush=True)
        codes.append(0 if result.bound in ("oom", "cap", "none") else 1)
    print(family_report.markdown(label, family_report.family_report(family_report.collect([args.out]).get(label, {})),
                                 meta, family_report.collect_max_batch([args.out]).get(label)))
    return codes


def device_name() -> str:
    """The GPU the candidates run on and its memory (a largest batch belongs to one card), or "cpu". Asked of
    nvidia-smi, not torch: a CUDA context in this process would hold memory through every candidate's run."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "cpu"
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "cpu"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", action="append", choices=sorted(FAMILIES), help="repeatable; default: all five")
    p.add_argument("--arms", default=None, help=f"comma-separated from {', '.join(ARMS)}; default all six "
                   f"({', '.join(CPU_ARMS)} with --dry-run)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per arm (default 200; 3 with --dry-run)")
    p.add_argument("--full", action="store_true", help="also full fine-tuning (--lora_r 0) where the YAML is LoRA "
                   "and the model fits one 80 GB GPU with AdamW (Phi 3.5)")
    p.add_argument("--full-only", action="store_true", help="only the full fine-tuning runs of --full")
    p.add_argument("--data", type=Path, default=None,
                   help="alpaca_5000.json and tokenizers/ (default .gpu_data, else $CCE_SHARED_DATA)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "outputs/families")))
    p.add_argument("--scratch", type=Path, default=Path("/tmp/cce_family_runs"), help="the recipe's output_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", type=int, default=None, help="steps left out of the median step time and tokens/s "
                   f"(default {family_report.SKIP}; 1 with --dry-run)")
    p.add_argument("--arm-timeout", type=float, default=None, help="seconds per arm before it is killed")
    p.add_argument("--dry-run", action="store_true", help="tiny architectures, 3 steps, on CPU (see above)")
    p.add_argument("--max-batch", action="store_true", help="instead of the timed runs: the largest per-device "
                   "batch that fits per arm (max_batch.py; see above)")
    p.add_argument("--max-batch-start", type=int, default=None,
                   help="first batch tried; it doubles from there (default: the YAML's per_device_train_batch_size; "
                        "1 with --dry-run)")
    p.add_argument("--max-batch-limit", type=int, default=None, help="largest batch tried; reaching it is reported "
                   "as the cap, not a memory limit (needed with --dry-run: a CPU never runs out of CUDA memory)")
    p.add_argument("--max-batch-steps", type=int, default=2, help="optimizer steps per candidate (default 2: the "
                   "second runs with the optimizer states allocated)")
    p.add_argument("--max-batch-tolerance", type=float, default=0.0, help="stop bisecting once the bracket is "
                   "within this fraction of the batch (default 0: the exact largest)")
    p.add_argument("--max-batch-timeout", type=float, default=600.0,
                   help="seconds per candidate; one over it stops the search (slow is not out of memory)")
    p.add_argument("extra", nargs="*", help="after --: more recipe flags, appended to every arm")
    args = p.parse_args(argv)
    args.families = args.family or list(FAMILIES)
    args.arms = (args.arms or ",".join(CPU_ARMS if args.dry_run else ARMS)).split(",")
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        p.error(f"unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")
    args.steps = args.steps or (3 if args.dry_run else 200)
    args.skip = args.skip if args.skip is not None else (1 if args.dry_run else family_report.SKIP)
    if args.data is None:
        local = ROOT / ".gpu_data"
        args.data = local if local.is_dir() else Path(os.environ.get("CCE_SHARED_DATA", local))
    if args.max_batch and args.dry_run and args.max_batch_limit is None:
        p.error("--max-batch --dry-run needs --max-batch-limit N: on CPU nothing runs out of CUDA memory")
    if args.max_batch_start is None and args.dry_run:
        args.max_batch_start = 1  # else the YAML's batch (the dry run's 2 is the dry run's, not the YAML's)
    if not (args.data / "alpaca_5000.json").is_file():
        p.error(f"{args.data / 'alpaca_5000.json'} not found (--data, or CCE_SHARED_DATA)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    codes = []
    run = max_batch_family if args.max_batch else run_family
    for name in args.families:
        family = FAMILIES[name]
        if not args.full_only:
            codes += run(args, name, family)
        if (args.full or args.full_only) and family.full_fine_tune == "option":
            codes += run(args, name, family, full=True)
        elif args.full or args.full_only:
            print(f"[{name}] no separate full fine-tuning run: "
                  + ("its YAML already trains all weights" if family.full_fine_tune == "yaml"
                     else "LoRA only: full fine-tuning with AdamW does not fit one 80 GB GPU"), flush=True)
    return 0 if all(rc == 0 for rc in codes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
