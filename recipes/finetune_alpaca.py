"""Alpaca instruction fine-tuning with the HF Trainer and Cut Cross-Entropy.

    accelerate launch recipes/finetune_alpaca.py                                  # embedded offline default
    accelerate launch recipes/finetune_alpaca.py configs/qwen2.5-7b.yaml          # a real model from the hub
    accelerate launch recipes/finetune_alpaca.py configs/llama3.1-8b.yaml --max_steps 100 --lora_r 32

A YAML file (first argument) holds any field of ``ScriptArguments`` and ``CCETrainingArguments``; command-line
flags override it. With no model given, the recipe trains the offline default: a tiny model, a word-level
tokenizer and a generated instruction dataset, all built here (see ``offline_default.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, HfArgumentParser, Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from alpaca_data import PROMPT_NO_INPUT, PROMPT_WITH_INPUT, tokenize_example  # noqa: E402
from offline_default import build_model, build_tokenizer, generate_dataset  # noqa: E402

from cce_patch.integrations.trainer import CCECallback, CCETrainingArguments  # noqa: E402

logger = logging.getLogger("finetune_alpaca")


@dataclass
class ScriptArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "Hub id or local path of the model."})
    model_config: str | None = field(
        default=None, metadata={"help": "Build a known architecture at random init instead (e.g. qwen2.5-0.5b)."}
    )
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Defaults to model_name_or_path."})
    dataset_path: str | None = field(default=None, metadata={"help": "Local JSON/JSONL with instruction/input/output."})
    dataset_name: str = field(default="tatsu-lab/alpaca", metadata={"help": "Hub dataset when no dataset_path."})
    max_length: int = 512
    eval_fraction: float = field(default=0.0, metadata={"help": "Share of rows held out for evaluation."})
    use_chat_template: bool = False
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 trains all weights."})
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    offline_examples: int = field(default=2000, metadata={"help": "Rows the offline default generates."})


OFFLINE_DEFAULTS = dict(
    output_dir="outputs/finetune-offline", max_steps=120, per_device_train_batch_size=16, learning_rate=3e-3,
    warmup_steps=5, logging_steps=5, save_strategy="no", report_to="none", use_cce=True, use_cpu=True,
    lr_scheduler_type="cosine", seed=0, max_length=96,
)


def parse_args(argv: list[str]) -> tuple[ScriptArguments, CCETrainingArguments]:
    """YAML file (optional first argument) + CLI overrides, with a clear error for unknown YAML keys."""
    parser = HfArgumentParser((ScriptArguments, CCETrainingArguments))
    base: dict = {}
    if argv and argv[0].endswith((".yaml", ".yml")):
        path, argv = Path(argv[0]), argv[1:]
        if not path.is_file():
            raise SystemExit(f"error: config file {path} does not exist")
        base = yaml.safe_load(path.read_text()) or {}
        known = {f.name for dc in (ScriptArguments, CCETrainingArguments) for f in dataclasses.fields(dc)}
        unknown = sorted(set(base) - known)
        if unknown:
            raise SystemExit(f"error: unknown key(s) {unknown} in {path}; see --help for the valid fields")
    elif not any(a.startswith("--model") for a in argv) and "--dataset_path" not in argv:
        base = dict(OFFLINE_DEFAULTS)
    base.setdefault("output_dir", "outputs/finetune")
    cli: list[str] = []
    for key, value in base.items():
        if isinstance(value, bool):
            cli += [f"--{key}", str(value)]
        elif isinstance(value, (dict, list)):
            import json

            cli += [f"--{key}", json.dumps(value)]
        else:
            cli += [f"--{key}", str(value)]
    script, train = parser.parse_args_into_dataclasses(args=cli + argv)
    return script, train


def load_rows(script: ScriptArguments, offline: bool):
    import datasets

    if offline:
        return datasets.Dataset.from_list(generate_dataset(script.offline_examples))
    if script.dataset_path:
        path = Path(script.dataset_path)
        if not path.is_file():
            raise SystemExit(f"error: dataset file {path} does not exist")
        return datasets.load_dataset("json", data_files=str(path), split="train")
    return datasets.load_dataset(script.dataset_name, split="train")


def load_model_and_tokenizer(script: ScriptArguments, train: CCETrainingArguments, rows, offline: bool):
    import torch

    if offline:
        template = PROMPT_WITH_INPUT + PROMPT_NO_INPUT
        tokenizer = build_tokenizer(list(rows), template)
        return build_model(len(tokenizer)), tokenizer
    dtype = torch.bfloat16 if train.bf16 else (torch.float16 if train.fp16 else torch.float32)
    tok_path = script.tokenizer_name_or_path or script.model_name_or_path
    if tok_path is None:
        raise SystemExit("error: give --tokenizer_name_or_path with --model_config")
    tokenizer = AutoTokenizer.from_pretrained(tok_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if script.model_config:
        from cce_patch.bench.e2e import make_config

        config = make_config(script.model_config)
        torch.manual_seed(train.seed)
        model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
        if len(tokenizer) > config.vocab_size:
            raise SystemExit(f"error: tokenizer has {len(tokenizer)} tokens, the model {config.vocab_size}")
    else:
        model = AutoModelForCausalLM.from_pretrained(script.model_name_or_path, torch_dtype=dtype)
    return model, tokenizer


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    script, train = parse_args(sys.argv[1:] if argv is None else argv)
    offline = script.model_name_or_path is None and script.model_config is None
    if offline:
        logger.info("no model given: training the embedded offline default (tiny model, generated data)")
    rows = load_rows(script, offline)
    model, tokenizer = load_model_and_tokenizer(script, train, rows, offline)
    if script.lora_r:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=script.lora_r, lora_alpha=script.lora_alpha, lora_dropout=script.lora_dropout,
                          target_modules=script.lora_target_modules.split(","), task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
        model.print_trainable_parameters()
    columns = rows.column_names
    data = rows.map(lambda r: tokenize_example(r, tokenizer, script.max_length, script.use_chat_template),
                    remove_columns=columns, desc="tokenizing")
    data = data.filter(lambda r: any(label != -100 for label in r["labels"]), desc="dropping rows with no response")
    eval_data = None
    if script.eval_fraction > 0:
        split = data.train_test_split(test_size=script.eval_fraction, seed=train.seed)
        data, eval_data = split["train"], split["test"]
    trainer = Trainer(
        model=model, args=train, train_dataset=data, eval_dataset=eval_data, processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        callbacks=[CCECallback()],
    )
    trainer.train(resume_from_checkpoint=train.resume_from_checkpoint)
    trainer.save_model(train.output_dir)
    trainer.save_state()  # trainer_state.json: the loss curve, also when no checkpoints are kept
    tokenizer.save_pretrained(train.output_dir)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if losses:
        logger.info("training loss: first %.4f -> last %.4f (%d logged steps)", losses[0], losses[-1], len(losses))
    if eval_data is not None:
        logger.info("eval: %s", trainer.evaluate())
    logger.info("saved to %s", os.path.abspath(train.output_dir))


if __name__ == "__main__":
    main()
