"""Alpaca instruction fine-tuning with TRL's SFTTrainer, whose fused LM head runs on Cut Cross-Entropy.

    accelerate launch recipes/finetune_trl_sft.py                                  # embedded offline default
    accelerate launch recipes/finetune_trl_sft.py configs/qwen2.5-7b.yaml          # a real model from the hub
    python recipes/finetune_trl_sft.py --max_steps 50 --use_cce false             # TRL's own head, to compare

The only cce_patch line is the config class: ``CCESFTConfig`` is TRL's ``SFTConfig`` with ``use_cce`` and
``cce_config``; with ``use_cce=True`` the SFTTrainer patches the model when it is built, and TRL's fused LM head
(``fused_lm_head=True``: per-token log-probs, entropy and token accuracy without logits) is computed by
cce_patch's kernel. The loss and the ``mean_token_accuracy`` / ``entropy`` metrics are TRL's, from our kernel.

Where things come from (the same arguments as ``finetune_alpaca.py``): ``--model_name_or_path`` (hub id or
local directory), ``--model_config`` (an architecture preset at random init), or neither: the tiny offline model
with a word-level tokenizer built from the text. Data: ``--dataset_path`` (local JSON/JSONL with
instruction/input/output), else ``--dataset_name`` (``tatsu-lab/alpaca`` when a model is given, the project's
generated tasks otherwise). The prompt is the Alpaca template (or the chat template) and only the response is
trained on (TRL's completion-only loss for prompt/completion data). With no model and no YAML the schedule is
the offline default's, ``configs/offline-tiny.yaml``, so it runs anywhere without network.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parent))
from alpaca_prompts import format_prompt  # noqa: E402
from finetune_alpaca import (  # noqa: E402
    OFFLINE_CONFIG,
    close_distributed,
    load_rows_and_model,
    yaml_defaults,
)
from offline_default import sample_answers  # noqa: E402

from cce_patch.integrations.trl import CCESFTConfig  # noqa: E402

logger = logging.getLogger("finetune_trl_sft")


@dataclass
class ScriptArguments:
    """Where the model and the data come from (``max_length``, ``packing`` and the schedule are SFTConfig's)."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "Hub id or local path of the model."})
    model_config: str | None = field(
        default=None, metadata={"help": "Random-init architecture: a preset name (qwen2.5-0.5b, ...) or a config.json."}
    )
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Defaults to model_name_or_path."})
    torch_dtype: str = field(default="auto", metadata={"help": "auto (bf16 with --bf16, else fp32), float32, bfloat16."})
    attn_implementation: str | None = field(default=None, metadata={"help": "sdpa, eager, flash_attention_2, ..."})
    dataset_path: str | None = field(default=None, metadata={"help": "Local JSON/JSONL with instruction/input/output."})
    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset (default tatsu-lab/alpaca), or 'generated' for the synthetic tasks."}
    )
    max_examples: int = field(default=0, metadata={"help": "Use only the first N rows (0: all)."})
    offline_examples: int = field(default=2000, metadata={"help": "Rows the generated dataset holds."})
    use_chat_template: bool = field(default=False, metadata={"help": "Format prompts with the tokenizer's chat template."})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 trains all weights."})
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    sample_answers: int = field(default=0, metadata={"help": "After training, greedy-answer N fresh generated tasks."})


def parse_args(argv: list[str]) -> tuple[ScriptArguments, CCESFTConfig]:
    """YAML file (optional first argument) + CLI overrides; with neither a model nor a YAML file, the offline
    default's schedule (``configs/offline-tiny.yaml``) in fp32 (SFTConfig's bf16 default is for GPUs)."""
    classes = (ScriptArguments, CCESFTConfig)
    parser = HfArgumentParser(classes)
    defaults: dict = {}
    if argv and argv[0].endswith((".yaml", ".yml")):
        defaults, argv = yaml_defaults(Path(argv[0]), classes), argv[1:]
    elif not any(a.split("=")[0] in ("--model_name_or_path", "--model_config") for a in argv):
        defaults = {**yaml_defaults(OFFLINE_CONFIG, classes), "output_dir": "outputs/finetune-trl-offline", "bf16": False}
    defaults.setdefault("output_dir", "outputs/finetune-trl")
    defaults.setdefault("use_cce", True)  # the point of this recipe; `--use_cce false` trains on TRL's own head
    parser.set_defaults(**defaults)
    script, train = parser.parse_args_into_dataclasses(args=argv)
    return script, train


def sft_rows(rows: list[dict[str, str]], tokenizer, use_chat_template: bool) -> list[dict[str, str]]:
    """Prompt/completion pairs: TRL trains on the completion only."""
    return [{"prompt": format_prompt(r, tokenizer, use_chat_template), "completion": r["output"]} for r in rows]


def main(argv: list[str] | None = None):
    """Run the recipe; returns the trainer. Restores torch's thread count, which the offline model lowers."""
    import torch

    threads = torch.get_num_threads()
    try:
        return _run(argv)
    finally:
        torch.set_num_threads(threads)


def _run(argv: list[str] | None):
    from datasets import Dataset
    from trl import SFTTrainer

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    script, train = parse_args(sys.argv[1:] if argv is None else argv)
    rows, model, tokenizer = load_rows_and_model(script, train)
    dataset = Dataset.from_list(sft_rows(rows, tokenizer, script.use_chat_template))
    try:
        trainer = SFTTrainer(model=model, args=train, train_dataset=dataset, processing_class=tokenizer)
    except NotImplementedError as exc:
        raise SystemExit(f"error: {exc}") from exc
    trainer.train(resume_from_checkpoint=train.resume_from_checkpoint)
    trainer.save_model(train.output_dir)
    trainer.save_state()
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    if logs:
        logger.info("training loss %.4f -> %.4f, mean_token_accuracy %.3f -> %.3f (%d logged steps)", logs[0]["loss"],
                    logs[-1]["loss"], logs[0]["mean_token_accuracy"], logs[-1]["mean_token_accuracy"], len(logs))
    if script.sample_answers and trainer.is_world_process_zero():
        samples, accuracy = sample_answers(trainer.model, tokenizer, script.sample_answers)
        for prompt, answer, expected in samples[:6]:
            logger.info("  %-55s -> %-24s (expected %s)", prompt, answer, expected)
        logger.info("exact match on %d fresh generated tasks: %.0f%%", len(samples), 100 * accuracy)
    logger.info("saved to %s", os.path.abspath(train.output_dir))
    return trainer


if __name__ == "__main__":
    main()
    close_distributed()
