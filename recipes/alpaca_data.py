"""Alpaca-style prompt formatting and response-only labels.

Each row has ``instruction``, optional ``input`` and ``output``. The prompt is the Alpaca template (or the
tokenizer's chat template); only the response tokens are trained on: every prompt token's label is -100.
"""

from __future__ import annotations

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


def format_prompt(row: dict[str, Any], tokenizer: Any = None, use_chat_template: bool = False) -> str:
    """The prompt part of a row (everything the model conditions on)."""
    instruction, context = row["instruction"].strip(), (row.get("input") or "").strip()
    if use_chat_template:
        user = f"{instruction}\n\n{context}" if context else instruction
        return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    template = PROMPT_WITH_INPUT if context else PROMPT_NO_INPUT
    return template.format(instruction=instruction, input=context)


def tokenize_example(
    row: dict[str, Any], tokenizer: Any, max_length: int, use_chat_template: bool = False
) -> dict[str, list[int]]:
    """input_ids = prompt + response + eos; labels = -100 on the prompt, the token ids on the response.

    Prompt and response are tokenized separately so the boundary is exact whatever the tokenizer merges.
    Truncation keeps the start (prompt first), so over-long rows lose response tokens, never the labels' mask.
    """
    prompt_ids = tokenizer(format_prompt(row, tokenizer, use_chat_template), add_special_tokens=not use_chat_template)[
        "input_ids"
    ]
    response_ids = tokenizer(row["output"].strip(), add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}
