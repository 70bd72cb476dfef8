"""The Alpaca recipe: configs parse, labels mask the prompt exactly, and it trains end to end via accelerate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

import finetune_alpaca  # noqa: E402
from alpaca_data import IGNORE_INDEX, format_prompt, load_local_rows, tokenize_example, tokenize_rows  # noqa: E402
from offline_default import build_tokenizer, generate_dataset  # noqa: E402

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_parses(path, tmp_path):
    import torch

    # TrainingArguments refuses bf16 without a GPU unless told to run on the CPU
    cpu = [] if torch.cuda.is_available() else ["--use_cpu", "true"]
    script, train = finetune_alpaca.parse_args([str(path), "--output_dir", str(tmp_path), *cpu])
    assert train.use_cce is True
    assert script.model_name_or_path or script.model_config or "offline" in path.name


def test_accelerate_configs_are_yaml():
    for path in (ROOT / "configs" / "accelerate").glob("*.yaml"):
        assert "distributed_type" in yaml.safe_load(path.read_text())


def test_bad_config_key_and_missing_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name_or_path: x\nlearning_rat: 0.1\n")
    with pytest.raises(SystemExit, match="unknown key"):
        finetune_alpaca.parse_args([str(bad)])
    with pytest.raises(SystemExit, match="does not exist"):
        finetune_alpaca.parse_args([str(tmp_path / "nope.yaml")])
    script, _ = finetune_alpaca.parse_args(["--dataset_path", str(tmp_path / "none.json"), "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="does not exist"):
        finetune_alpaca.load_rows(script)
    bad_rows = tmp_path / "rows.jsonl"
    bad_rows.write_text('{"instruction": "a"}\n')
    script, _ = finetune_alpaca.parse_args(["--dataset_path", str(bad_rows), "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="lacks"):
        finetune_alpaca.load_rows(script)
    with pytest.raises(SystemExit, match="unknown model_config"):
        finetune_alpaca.architecture_config("no-such-arch")
    with pytest.raises(ValueError, match="bogus"):
        finetune_alpaca.parse_args(["--cce_config", '{"impl": "torch", "bogus": 1}', "--output_dir", str(tmp_path)])


def test_model_that_cannot_be_patched_exits_with_its_type(tmp_path):
    """An architecture cce_patch refuses (Mixtral: router auxiliary loss) stops the recipe before training."""
    import transformers

    config = transformers.MixtralConfig(vocab_size=512, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=2)
    config.save_pretrained(tmp_path / "mixtral")
    data = tmp_path / "data.json"
    data.write_text(json.dumps(generate_dataset(16, seed=5)))
    tok_dir = tmp_path / "tok"
    build_tokenizer(generate_dataset(16, seed=5), "x").save_pretrained(tok_dir)
    with pytest.raises(SystemExit, match="cannot patch MixtralForCausalLM"):
        finetune_alpaca.main(["--model_config", str(tmp_path / "mixtral"), "--tokenizer_name_or_path", str(tok_dir),
                              "--dataset_path", str(data), "--use_cce", "true", "--use_cpu", "true", "--max_steps", "1",
                              "--report_to", "none", "--output_dir", str(tmp_path / "out")])


def test_prompt_tokens_are_masked_exactly():
    rows = generate_dataset(50, seed=3)
    tok = build_tokenizer(rows, "x")
    for row in rows[:10]:
        ex = tokenize_example(row, tok, max_length=512)
        n_prompt = len(tok(format_prompt(row))["input_ids"])
        assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
        assert ex["labels"][-1] == tok.eos_token_id and len(ex["input_ids"]) > n_prompt
    truncated = tokenize_example(rows[0], tok, max_length=5)
    assert len(truncated["input_ids"]) == len(truncated["labels"]) == 5


def _launch(args, tmp_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
           str(ROOT / "recipes" / "finetune_alpaca.py"), *args]
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_offline_default_via_accelerate(tmp_path):
    log = _launch(["--max_steps", "3", "--logging_steps", "1", "--output_dir", str(tmp_path / "out")], tmp_path)
    assert "patched LlamaForCausalLM" in log and "training loss" in log
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_local_dataset_path_via_accelerate(tmp_path):
    """A local JSON dataset with the offline tiny model + tokenizer saved by a previous run."""
    data = tmp_path / "data.json"
    data.write_text(json.dumps(generate_dataset(64, seed=7)))
    model_dir = tmp_path / "m"
    _launch(["--max_steps", "1", "--output_dir", str(model_dir)], tmp_path)
    log = _launch(["--model_name_or_path", str(model_dir), "--dataset_path", str(data), "--max_steps", "2",
                   "--use_cce", "true", "--use_cpu", "true", "--max_length", "64", "--report_to", "none",
                   "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "out2")], tmp_path)
    assert "patched LlamaForCausalLM" in log


@pytest.mark.skipif(not os.environ.get("CCE_SHARED_DATA"), reason="CCE_SHARED_DATA not set")
def test_real_alpaca_with_qwen_tokenizer(tmp_path):
    """A few steps on the real Alpaca sample, tokenized by the real Qwen2.5 tokenizer (tiny Qwen2 model)."""
    import torch
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Qwen2Config, Qwen2ForCausalLM, Trainer

    from cce_patch import is_patched
    from cce_patch.integrations.trainer import CCECallback, CCETrainingArguments

    shared = Path(os.environ["CCE_SHARED_DATA"])
    tok = AutoTokenizer.from_pretrained(shared / "tokenizers" / "qwen2.5")
    rows = load_local_rows(shared / "alpaca_5000.json")[:64]
    data = tokenize_rows(rows, tok, 128)
    assert all(IGNORE_INDEX in ex["labels"] and ex["labels"][-1] != IGNORE_INDEX for ex in data)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    args = CCETrainingArguments(output_dir=str(tmp_path), use_cce=True, max_steps=4, per_device_train_batch_size=8,
                                learning_rate=1e-3, report_to="none", use_cpu=True, logging_steps=1, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[CCECallback()],
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert is_patched(model)
    assert len(losses) == 4 and all(l == l for l in losses) and losses[-1] < losses[0]


def test_offline_yaml_spells_out_the_no_argument_default(tmp_path):
    """configs/offline-tiny.yaml documents what `make finetune` runs; keep the two from drifting apart."""
    no_args = finetune_alpaca.parse_args([])
    from_yaml = finetune_alpaca.parse_args([str(ROOT / "configs" / "offline-tiny.yaml")])
    assert no_args[0] == from_yaml[0]
    keys = ("max_steps", "learning_rate", "per_device_train_batch_size", "warmup_steps", "logging_steps", "use_cce")
    assert [getattr(no_args[1], k) for k in keys] == [getattr(from_yaml[1], k) for k in keys]
