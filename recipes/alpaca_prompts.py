"""Alpaca-style rows: loading local files, prompt formatting and response-only labels.

Each row has ``instruction``, optional ``input`` and ``output``. The prompt is the Alpaca template (or the
tokenizer's chat template); only the response tokens are trained on: every prompt token's label is -100.
Local files are read with the standard library, so the recipe needs the ``datasets`` package only for hub
datasets (the GPU image has no ``datasets``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
IGNORE_INDEX = -100
REQUIRED_KEYS = ("instruction", "output")


def load_local_rows(path: str | Path) -> list[dict[str, str]]:
    """Rows from a JSON array or a JSONL file, with a clear error for a missing file or missing keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is neither a JSON array nor JSON lines: {exc}") from exc
    for i, row in enumerate(rows):
        missing = [k for k in REQUIRED_KEYS if not isinstance(row, dict) or k not in row]
        if missing:
            raise ValueError(f"{path}: row {i} lacks {missing}; rows need instruction, output and optionally input")
    if not rows:
        raise ValueError(f"{path} holds no rows")
    return rows


def format_prompt(row: dict[str, Any], tokenizer: Any = None, use_chat_template: bool = False) -> str:
    """The prompt part of a row (everything the model conditions on)."""
    instruction, context = row["instruction"].strip(), (row.get("input") or "").strip()
    if use_chat_template:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("use_chat_template is set but the tokenizer has no chat template")
        user = f"{instruction}\n\n{context}" if context else instruction
        return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    template = PROMPT_WITH_INPUT if context else PROMPT_NO_INPUT
    return template.format(instruction=instruction, input=context)


def _assemble(prompt_ids: list[int], response_ids: list[int], eos_id: int | None, max_length: int) -> dict[str, list[int]]:
    if eos_id is not None:
        response_ids = response_ids + [eos_id]
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def tokenize_example(
    row: dict[str, Any], tokenizer: Any, max_length: int, use_chat_template: bool = False
) -> dict[str, list[int]]:
    """input_ids = prompt + response + eos; labels = -100 on the prompt, the token ids on the response.

    Prompt and response are tokenized separately so the boundary is exact whatever the tokenizer merges.
    Truncation keeps the start (prompt first), so over-long rows lose response tokens, never the labels' mask.
    """
    return tokenize_rows([row], tokenizer, max_length, use_chat_template)[0]


def tokenize_rows(
    rows: list[dict[str, Any]], tokenizer: Any, max_length: int, use_chat_template: bool = False
) -> list[dict[str, list[int]]]:
    """``tokenize_example`` for many rows, with one batched tokenizer call per side (fast tokenizers run it
    in parallel in Rust)."""
    prompts = [format_prompt(r, tokenizer, use_chat_template) for r in rows]
    # the chat template already holds the special tokens (BOS, turn markers); the Alpaca prompt gets them here
    prompt_ids = tokenizer(prompts, add_special_tokens=not use_chat_template)["input_ids"]
    response_ids = tokenizer([r["output"].strip() for r in rows], add_special_tokens=False)["input_ids"]
    return [_assemble(p, r, tokenizer.eos_token_id, max_length) for p, r in zip(prompt_ids, response_ids, strict=True)]


def full_length_rows(examples: list[dict[str, list[int]]], max_length: int, min_rows: int = 1) -> list[dict[str, list[int]]]:
    """The tokenized examples concatenated in order and cut into rows of exactly ``max_length`` tokens (the
    tail shorter than that is dropped), each example keeping its labels (-100 on its prompt); repeated in order
    until there are at least ``min_rows`` rows.

    Why: the recipe pads each batch to its longest example (Alpaca's are ~100-300 tokens), so a batch at the
    YAML's ``max_length`` never happens with real rows; the largest-batch probe (``max_batch.py``) needs every
    batch to be the worst case, ``batch x max_length`` real tokens with no padding and a full attention mask.
    Examples run into each other inside a row (no separator, attention crosses the boundary): for memory that
    is the same as one long example. ``min_rows`` makes every batch full: a batch larger than the dataset
    would otherwise come out short.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be positive, not {max_length}")
    ids = [t for ex in examples for t in ex["input_ids"]]
    labels = [t for ex in examples for t in ex["labels"]]
    rows = [{"input_ids": ids[i:i + max_length], "attention_mask": [1] * max_length,
             "labels": labels[i:i + max_length]} for i in range(0, len(ids) - max_length + 1, max_length)]
    if not rows:
        raise ValueError(f"the examples hold {len(ids)} tokens in all, fewer than one row of {max_length}")
    return [rows[i % len(rows)] for i in range(max(min_rows, len(rows)))]
