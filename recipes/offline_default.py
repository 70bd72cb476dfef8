"""The embedded offline default: a small instruction dataset, a tokenizer and a tiny model, all made here.

Nothing is downloaded and nothing is copied: the tasks are generated from templates (arithmetic, reversing,
sorting, counting, case changes), the tokenizer is a word-level vocabulary built from that text at run time,
and the model is a 2-layer Llama-architecture network built from a config. It exists so that the recipe runs
end to end on any machine in well under a minute of training, with a loss that visibly falls, and shows a few
greedy answers on new generated tasks at the end (a sanity check, not a benchmark).
"""

from __future__ import annotations

import random
import re

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = (
    "apple river stone cloud green music paper light table window garden silver orange planet forest "
    "bridge candle rocket winter summer yellow purple ocean mountain valley"
).split()


def _task(rng: random.Random) -> dict[str, str]:
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randrange(10), rng.randrange(10)
        return {"instruction": "Add the two numbers.", "input": f"{a} {b}", "output": str(a + b)}
    if kind == 1:
        words = rng.sample(WORDS, rng.randrange(2, 6))
        return {"instruction": "Reverse the order of the words.", "input": " ".join(words), "output": " ".join(words[::-1])}
    if kind == 2:
        nums = [rng.randrange(50) for _ in range(rng.randrange(3, 7))]
        return {"instruction": "Sort the numbers from smallest to largest.", "input": " ".join(map(str, nums)),
                "output": " ".join(map(str, sorted(nums)))}
    if kind == 3:
        words = rng.sample(WORDS, rng.randrange(1, 8))
        return {"instruction": "How many words are in the input?", "input": " ".join(words), "output": str(len(words))}
    if kind == 4:
        word = rng.choice(WORDS)
        return {"instruction": f"Write the word {word} in capital letters.", "input": "", "output": word.upper()}
    a, b = rng.randrange(2, 13), rng.randrange(2, 13)
    return {"instruction": "Multiply the two numbers.", "input": f"{a} {b}", "output": str(a * b)}


def generate_dataset(n: int = 2000, seed: int = 0) -> list[dict[str, str]]:
    """``n`` instruction/input/output rows, deterministic in ``seed``."""
    rng = random.Random(seed)
    return [_task(rng) for _ in range(n)]


def build_tokenizer(rows: list[dict[str, str]], template_text: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (words, numbers, punctuation) whose vocabulary covers the data and the template."""
    split = re.compile(r"\w+|[^\w\s]")
    vocab = ["<pad>", "<s>", "</s>", "<unk>"]
    seen = set(vocab)
    texts = [template_text] + [" ".join(r.values()) for r in rows]
    for text in texts:
        for tok in split.findall(text):
            if tok not in seen:
                seen.add(tok)
                vocab.append(tok)
    # single digits so unseen numbers still tokenize
    for d in "0123456789":
        if d not in seen:
            vocab.append(d)
    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def build_model(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama-architecture model small enough to train on two CPU cores in a minute."""
    import torch

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def sample_answers(model, tokenizer, n: int = 40, seed: int = 12345, max_new_tokens: int = 12):
    """Greedy answers to ``n`` fresh generated tasks: (prompt text, answer, expected) rows and the exact-match
    rate. The tasks come from another seed than the training rows."""
    import torch
    from alpaca_prompts import format_prompt

    model.eval()
    rows, hits = [], 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for row in generate_dataset(n, seed=seed):
            ids = tokenizer(format_prompt(row), return_tensors="pt")["input_ids"].to(device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
            hits += answer.split() == row["output"].split()
            rows.append((f"{row['instruction']} {row['input']}".strip(), answer, row["output"]))
    return rows, hits / max(n, 1)
