"""Alpaca instruction fine-tuning with the HF Trainer and Cut Cross-Entropy.

    accelerate launch recipes/finetune_alpaca.py                                  # embedded offline default
    accelerate launch recipes/finetune_alpaca.py configs/qwen2.5-7b.yaml          # a real model from the hub
    accelerate launch recipes/finetune_alpaca.py configs/llama3.1-8b.yaml --max_steps 100 --lora_r 32

A YAML file (first argument) holds any field of ``ScriptArguments`` and ``CCETrainingArguments``; command-line
flags override it. Where the model comes from:

- ``--model_name_or_path``: ``AutoModelForCausalLM.from_pretrained`` (hub id or local directory);
- ``--model_config``: a real architecture at random init, by name (``qwen2.5-0.5b``, ``llama3.2-1b``,
  ``gemma2-2b``) or a local ``config.json`` / directory holding one (no network needed);
- neither: the tiny offline model (``offline_default.py``), with the tokenizer given by
  ``--tokenizer_name_or_path`` or, by default, a word-level tokenizer built from the training text.

The data: ``--dataset_path`` (local JSON/JSONL), else ``--dataset_name`` (default ``tatsu-lab/alpaca`` when a
model is given; ``generated`` — the project's own synthetic tasks — when none is).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parent))
from alpaca_prompts import (  # noqa: E402
    PROMPT_NO_INPUT,
    PROMPT_WITH_INPUT,
    full_length_rows,
    load_local_rows,
    tokenize_rows,
)
from offline_default import build_model, build_tokenizer, generate_dataset, sample_answers  # noqa: E402

from cce_patch.integrations.trainer import CCETrainer, CCETrainingArguments  # noqa: E402

logger = logging.getLogger("finetune_alpaca")
GENERATED = "generated"


@dataclass
class ScriptArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "Hub id or local path of the model."})
    model_config: str | None = field(
        default=None,
        metadata={"help": "Random-init architecture: a known name (qwen2.5-0.5b, llama3.2-1b, gemma2-2b) or a config.json."},
    )
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Defaults to model_name_or_path."})
    torch_dtype: str = field(
        default="auto", metadata={"help": "Weights dtype: auto (bf16 with --bf16, else fp32), float32, bfloat16, float16."}
    )
    attn_implementation: str | None = field(default=None, metadata={"help": "sdpa, eager, flash_attention_2, ..."})
    dataset_path: str | None = field(default=None, metadata={"help": "Local JSON/JSONL with instruction/input/output."})
    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset (default tatsu-lab/alpaca), or 'generated' for the synthetic tasks."}
    )
    max_length: int = field(default=512, metadata={"help": "Tokens per example after truncation."})
    max_examples: int = field(default=0, metadata={"help": "Use only the first N rows (0: all)."})
    eval_fraction: float = field(default=0.0, metadata={"help": "Share of rows held out for evaluation."})
    use_chat_template: bool = field(default=False, metadata={"help": "Format prompts with the tokenizer's chat template."})
    packing: bool = field(
        default=False,
        metadata={"help": "Padding-free batches: each batch is one flat row with per-example position_ids."},
    )
    full_length_rows: bool = field(
        default=False,
        metadata={"help": "Concatenate the examples and cut them into rows of exactly max_length tokens, so every "
                          "batch is batch x max_length real tokens (the worst case for memory: the largest-batch "
                          "probe, recipes/max_batch.py); not for training a model."},
    )
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 trains all weights."})
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    offline_examples: int = field(default=2000, metadata={"help": "Rows the generated dataset holds."})
    sample_answers: int = field(default=0, metadata={"help": "After training, greedy-answer N fresh generated tasks."})
    save_final_model: bool = field(
        default=True, metadata={"help": "Save the model (or adapter) to output_dir after training; benchmarks say no."}
    )


#: What the recipe does with no model and no YAML file: the embedded offline default, defined in this one file
#: (the tiny model, the generated tasks, the schedule). 500 steps run at ~19-25 steps/s on one CPU core.
OFFLINE_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "offline-tiny.yaml"


def yaml_defaults(path: Path, argument_classes: tuple[type, ...] | None = None) -> dict:
    """A YAML file's keys as parser defaults, with a clear error for a missing file or for keys that none of
    ``argument_classes`` (default: this recipe's) has. The TRL recipe uses it with its own classes."""
    if not path.is_file():
        raise SystemExit(f"error: config file {path} does not exist")
    defaults = yaml.safe_load(path.read_text()) or {}
    if not isinstance(defaults, dict):
        raise SystemExit(f"error: {path} must hold a mapping of argument names to values")
    classes = argument_classes or (ScriptArguments, CCETrainingArguments)
    known = {f.name for dc in classes for f in dataclasses.fields(dc)}
    unknown = sorted(set(defaults) - known)
    if unknown:
        raise SystemExit(f"error: unknown key(s) {unknown} in {path}; run with --help for the valid fields")
    return defaults


def parse_args(argv: list[str]) -> tuple[ScriptArguments, CCETrainingArguments]:
    """YAML file (optional first argument) + CLI overrides, with a clear error for unknown YAML keys.

    YAML values become the parser's defaults, so any flag on the command line overrides them, and values keep
    their YAML types (a ``cce_config`` mapping stays a dict).
    """
    parser = HfArgumentParser((ScriptArguments, CCETrainingArguments))
    defaults: dict = {}
    if argv and argv[0].endswith((".yaml", ".yml")):
        defaults, argv = yaml_defaults(Path(argv[0])), argv[1:]
    elif not any(a.split("=")[0] in ("--model_name_or_path", "--model_config") for a in argv):
        defaults = yaml_defaults(OFFLINE_CONFIG)
    defaults.setdefault("output_dir", "outputs/finetune")
    defaults.setdefault("use_cce", True)  # the point of this recipe; `--use_cce false` runs the stock loss to compare
    parser.set_defaults(**defaults)
    script, train = parser.parse_args_into_dataclasses(args=argv)
    return script, train


def load_rows(script: ScriptArguments) -> list[dict[str, str]]:
    """The instruction rows: local file, generated tasks, or a hub dataset (the only case needing ``datasets``)."""
    if script.dataset_path:
        try:
            rows = load_local_rows(script.dataset_path)
        except (FileNotFoundError, ValueError) as exc:
            raise SystemExit(f"error: {exc}") from exc
    elif dataset_name(script) == GENERATED:
        rows = generate_dataset(script.offline_examples)
    else:
        try:
            import datasets
        except ImportError as exc:
            raise SystemExit(
                f"error: loading {dataset_name(script)!r} from the hub needs the `datasets` package (pip install "
                "'cce_patch[recipes]'); or pass --dataset_path to a local Alpaca-format JSON file") from exc

        rows = list(datasets.load_dataset(dataset_name(script), split="train"))
    return rows[: script.max_examples] if script.max_examples else rows


def dataset_name(script: ScriptArguments) -> str:
    if script.dataset_name:
        return script.dataset_name
    return "tatsu-lab/alpaca" if (script.model_name_or_path or script.model_config) else GENERATED


def _dtype(script: ScriptArguments, train: CCETrainingArguments):
    import torch

    if script.torch_dtype == "auto":
        return torch.bfloat16 if train.bf16 else (torch.float16 if train.fp16 else torch.float32)
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[script.torch_dtype]
    except KeyError:
        raise SystemExit(f"error: torch_dtype must be auto, float32, bfloat16 or float16, not {script.torch_dtype!r}") from None


def architecture_config(name_or_path: str):
    """A transformers config from a known architecture name (numbers from the published configs) or a file."""
    from transformers import AutoConfig

    path = Path(name_or_path)
    if path.is_dir() or path.suffix == ".json":
        if not path.exists():
            raise SystemExit(f"error: model config {path} does not exist")
        return AutoConfig.from_pretrained(str(path))
    from cce_patch.models.architectures import ARCHITECTURES, architecture_config

    if name_or_path not in ARCHITECTURES:
        raise SystemExit(f"error: unknown model_config {name_or_path!r}; use a preset ({', '.join(ARCHITECTURES)}) "
                         "or a config.json")
    return architecture_config(name_or_path)


def load_model_and_tokenizer(script: ScriptArguments, train: CCETrainingArguments, rows: list[dict[str, str]]):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok_path = script.tokenizer_name_or_path or script.model_name_or_path
    if tok_path is None and script.model_config:
        raise SystemExit("error: --model_config needs --tokenizer_name_or_path")
    if tok_path is None:
        tokenizer = build_tokenizer(rows, PROMPT_WITH_INPUT + PROMPT_NO_INPUT)
        logger.info("built a word-level tokenizer of %d tokens from the training text", len(tokenizer))
    else:
        tokenizer = AutoTokenizer.from_pretrained(tok_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = _dtype(script, train)
    extra = {"attn_implementation": script.attn_implementation} if script.attn_implementation else {}
    if script.model_name_or_path:
        model = AutoModelForCausalLM.from_pretrained(script.model_name_or_path, dtype=dtype, **extra)
    elif script.model_config:
        config = architecture_config(script.model_config)
        if len(tokenizer) > config.vocab_size:
            raise SystemExit(f"error: the tokenizer has {len(tokenizer)} tokens but the model only {config.vocab_size}")
        torch.manual_seed(train.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **extra)
        logger.info("built %s (%s) at random init: %.1fM parameters", type(model).__name__, script.model_config,
                    sum(p.numel() for p in model.parameters()) / 1e6)
    else:
        model = build_model(len(tokenizer), seed=train.seed).to(dtype)
        if train.use_cpu or not torch.cuda.is_available():
            # Its matmuls are ~64 wide: a second thread only adds synchronisation, and on a loaded machine
            # spinning OpenMP threads made steps ~20x slower (measured: 23 steps/s idle, 1.2 steps/s loaded).
            torch.set_num_threads(1)
    return model, tokenizer


def prepare_data(script: ScriptArguments, train: CCETrainingArguments, rows: list[dict[str, str]], tokenizer):
    """Tokenized train (and eval) examples; rows left with no response token after truncation are dropped."""
    examples = tokenize_rows(rows, tokenizer, script.max_length, script.use_chat_template)
    kept = [ex for ex in examples if any(label != -100 for label in ex["labels"])]
    if len(kept) < len(examples):
        logger.warning("dropped %d of %d rows whose response was cut off by max_length=%d",
                       len(examples) - len(kept), len(examples), script.max_length)
    if not kept:
        raise SystemExit("error: no example keeps a response token; raise --max_length")
    if script.full_length_rows:
        if script.packing:
            raise SystemExit("error: full_length_rows and packing are two ways to lay out a batch; choose one")
        # enough rows that no batch of the run comes out short (the Trainer would hand over what is left)
        need = train.per_device_train_batch_size * train.gradient_accumulation_steps * max(1, train.max_steps)
        try:
            full = full_length_rows(kept, script.max_length, need)
        except ValueError as exc:
            raise SystemExit(f"error: {exc}") from exc
        logger.info("full_length_rows: %d examples -> %d rows of exactly %d tokens (%.0f%% of labels trained)",
                    len(kept), len(full), script.max_length,
                    100 * sum(t != -100 for r in full for t in r["labels"]) / (len(full) * script.max_length))
        kept = full
    if script.eval_fraction <= 0:
        return kept, None
    random.Random(train.seed).shuffle(kept)
    n_eval = max(1, int(len(kept) * script.eval_fraction))
    return kept[n_eval:], kept[:n_eval]


def collator(script: ScriptArguments, tokenizer):
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if script.packing:
        # one flat row per batch; position_ids restart per example, from which transformers builds
        # per-example (block-causal) attention masks
        return DataCollatorWithFlattening(separator_id=-100)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, pad_to_multiple_of=8)


def add_lora(model, script: ScriptArguments):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=script.lora_r, lora_alpha=script.lora_alpha, lora_dropout=script.lora_dropout,
                      target_modules=script.lora_target_modules.split(","), task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("LoRA r=%d on %s: %.2fM trainable parameters", script.lora_r, script.lora_target_modules, trainable / 1e6)
    return model


def main(argv: list[str] | None = None, callbacks: list | None = None) -> CCETrainer:
    """Run the recipe; returns the trainer. ``callbacks`` join the Trainer's (``timed_finetune.py`` records each
    step with one). Restores torch's thread count, which the offline model lowers."""
    import torch

    threads = torch.get_num_threads()
    try:
        return _run(argv, callbacks)
    finally:
        torch.set_num_threads(threads)


def load_rows_and_model(script, train) -> tuple[list[dict[str, str]], Any, Any]:
    """(rows, model, tokenizer): the start every recipe shares (this one and finetune_trl_sft.py): the Alpaca rows,
    the model and tokenizer they size (the offline tiny model when no model is given), LoRA where asked."""
    if not (script.model_name_or_path or script.model_config):
        logger.info("no model given: training the embedded offline tiny model (data: %s)",
                    script.dataset_path or dataset_name(script))
    rows = load_rows(script)
    model, tokenizer = load_model_and_tokenizer(script, train, rows)
    if script.lora_r:
        model = add_lora(model, script)
    return rows, model, tokenizer


def _run(argv: list[str] | None, callbacks: list | None = None) -> CCETrainer:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    script, train = parse_args(sys.argv[1:] if argv is None else argv)
    rows, model, tokenizer = load_rows_and_model(script, train)
    train_data, eval_data = prepare_data(script, train, rows, tokenizer)
    logger.info("%d training examples, %d eval examples", len(train_data), len(eval_data or []))
    try:
        trainer = CCETrainer(
            model=model, args=train, train_dataset=train_data, eval_dataset=eval_data, processing_class=tokenizer,
            data_collator=collator(script, tokenizer), callbacks=callbacks,
        )
    except NotImplementedError as exc:
        raise SystemExit(f"error: {exc}") from exc
    trainer.train(resume_from_checkpoint=train.resume_from_checkpoint)
    if script.save_final_model:
        trainer.save_model(train.output_dir)
    trainer.save_state()  # trainer_state.json: the loss curve, also when no checkpoints are kept
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if losses:
        logger.info("training loss: first %.4f -> last %.4f (%d logged steps)", losses[0], losses[-1], len(losses))
    if eval_data is not None:
        logger.info("eval: %s", trainer.evaluate())
    if script.sample_answers and trainer.is_world_process_zero():
        samples, accuracy = sample_answers(trainer.model, tokenizer, script.sample_answers)
        for prompt, answer, expected in samples[:6]:
            logger.info("  %-55s -> %-24s (expected %s)", prompt, answer, expected)
        logger.info("exact match on %d fresh generated tasks: %.0f%%", len(samples), 100 * accuracy)
    logger.info("saved to %s", os.path.abspath(train.output_dir))
    return trainer


def close_distributed() -> None:
    """Destroy the process group a distributed launch (torchrun, accelerate launch) set up, once training is
    over. Why: a gloo group left to the interpreter's exit can abort a rank at shutdown ("terminate called
    without an active exception", SIGABRT) after a run that finished, which fails the whole launch; PyTorch
    asks for an explicit destroy_process_group() for that reason."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # every rank done (rank 0 may still be writing its files) before the group goes
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    close_distributed()
