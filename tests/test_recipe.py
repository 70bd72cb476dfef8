"""The Alpaca recipe: configs parse, labels mask the prompt exactly, and it trains end to end (through
``accelerate launch`` for the offline default and a local dataset; in-process for the rest, to stay fast)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

import finetune_alpaca  # noqa: E402
from alpaca_prompts import IGNORE_INDEX, format_prompt, load_local_rows, tokenize_example, tokenize_rows  # noqa: E402
from offline_default import build_tokenizer, generate_dataset  # noqa: E402

from cce_patch import is_patched  # noqa: E402

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
#: family config -> the instruct model's hub id (ANCHORS.md)
HUB_IDS = {
    "gemma2-2b.yaml": "google/gemma-2-2b-it",
    "qwen2.5-7b.yaml": "Qwen/Qwen2.5-7B-Instruct",
    "phi3.5-mini.yaml": "microsoft/Phi-3.5-mini-instruct",
    "mistral-nemo-12b.yaml": "mistralai/Mistral-Nemo-Instruct-2407",
    "llama3.1-8b.yaml": "meta-llama/Llama-3.1-8B-Instruct",
}
CPU = [] if torch.cuda.is_available() else ["--use_cpu", "true"]  # bf16 configs need a GPU unless told otherwise
@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """In-process recipe runs pin torch to one thread for the tiny model; give the rest of the suite its threads back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


QUICK = ["--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", "--logging_steps", "1"]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_parses(path, tmp_path):
    script, train = finetune_alpaca.parse_args([str(path), "--output_dir", str(tmp_path), *CPU])
    assert train.use_cce is True and train.output_dir == str(tmp_path)  # the CLI overrides the YAML
    if path.name in HUB_IDS:
        assert script.model_name_or_path == HUB_IDS[path.name]
    else:
        assert script.model_name_or_path is None


def test_family_configs_exist():
    assert set(HUB_IDS) <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=[p.name for p in ACCELERATE_CONFIGS])
def test_accelerate_configs_load(path):
    """accelerate's own loader accepts them (it refuses unknown keys); FSDP is version 2 where supported."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    if path.stem == "fsdp2":
        assert config.fsdp_config["fsdp_version"] == 2
    if path.stem == "zero3":
        assert config.deepspeed_config["zero_stage"] == 3


def test_bad_config_key_and_missing_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name_or_path: x\nlearning_rat: 0.1\n")
    with pytest.raises(SystemExit, match=r"unknown key\(s\) \['learning_rat'\]"):
        finetune_alpaca.parse_args([str(bad)])
    with pytest.raises(SystemExit, match="does not exist"):
        finetune_alpaca.parse_args([str(tmp_path / "nope.yaml")])
    script, _ = finetune_alpaca.parse_args(["--dataset_path", str(tmp_path / "none.json"), "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="none.json does not exist"):
        finetune_alpaca.load_rows(script)
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    with pytest.raises(ValueError, match=r"row 1 lacks \['output'\]"):
        load_local_rows(rows)
    with pytest.raises(SystemExit, match="unknown model_config"):
        finetune_alpaca.architecture_config("gpt-9")
    with pytest.raises(ValueError, match="bogus"):
        finetune_alpaca.parse_args(["--cce_config", '{"impl": "torch", "bogus": 1}', "--output_dir", str(tmp_path)])


def test_no_arguments_run_the_offline_yaml():
    """With no model and no YAML file the recipe reads configs/offline-tiny.yaml, the offline default's only
    definition; flags still override it."""
    script, train = finetune_alpaca.parse_args([])
    assert finetune_alpaca.OFFLINE_CONFIG == ROOT / "configs" / "offline-tiny.yaml"
    assert (script.dataset_name, train.max_steps, train.use_cce, train.use_cpu) == ("generated", 500, True, True)
    _, train = finetune_alpaca.parse_args(["--max_steps", "7"])
    assert train.max_steps == 7 and train.learning_rate == 3e-3


def test_local_rows_json_and_jsonl(tmp_path):
    data = generate_dataset(5, seed=1)
    (tmp_path / "a.json").write_text(json.dumps(data))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in data) + "\n")
    assert load_local_rows(tmp_path / "a.json") == load_local_rows(tmp_path / "a.jsonl") == data


def test_prompt_tokens_are_masked_exactly():
    rows = generate_dataset(50, seed=3)
    tok = build_tokenizer(rows, "x")
    for row in rows[:10]:
        ex = tokenize_example(row, tok, max_length=512)
        n_prompt = len(tok(format_prompt(row))["input_ids"])
        assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
        assert ex["labels"][-1] == tok.eos_token_id and len(ex["input_ids"]) > n_prompt
        assert tok.decode(ex["input_ids"][n_prompt:-1]).split() == row["output"].split()
    assert tokenize_rows(rows[:10], tok, 512) == [tokenize_example(r, tok, 512) for r in rows[:10]]
    truncated = tokenize_example(rows[0], tok, max_length=5)
    assert len(truncated["input_ids"]) == len(truncated["labels"]) == 5
    assert truncated["labels"] == [IGNORE_INDEX] * 5


def test_chat_template_prompt_is_masked():
    rows = generate_dataset(4, seed=5)
    tok = build_tokenizer(rows, "user assistant :")
    tok.chat_template = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}assistant :"
    with pytest.raises(ValueError, match="no chat template"):
        format_prompt(rows[0], build_tokenizer(rows, "x"), use_chat_template=True)
    ex = tokenize_example(rows[0], tok, 512, use_chat_template=True)
    prompt = tok(format_prompt(rows[0], tok, True), add_special_tokens=False)["input_ids"]
    assert tok.decode(prompt).split()[:2] == ["user", ":"] and prompt[-1] == tok.convert_tokens_to_ids(":")
    assert ex["labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt) and ex["labels"][len(prompt)] != IGNORE_INDEX


def _launch(args, cwd):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
           str(ROOT / "recipes" / "finetune_alpaca.py"), *args]
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_offline_default_via_accelerate(tmp_path):
    """The `make finetune` command with a few steps: patched, trained, saved, answers sampled."""
    log = _launch(["--max_steps", "3", "--logging_steps", "1", "--sample_answers", "2",
                   "--output_dir", str(tmp_path / "out")], tmp_path)
    assert "patched LlamaForCausalLM (model_type=llama)" in log and "training loss: first" in log
    assert "exact match on 2 fresh generated tasks" in log
    out = tmp_path / "out"
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3


def test_local_dataset_path_via_accelerate(tmp_path):
    """A generated JSONL file through --dataset_path (tiny model, tokenizer built on the file), with an eval split."""
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in generate_dataset(48, seed=7)))
    log = _launch(["--dataset_path", str(data), "--max_steps", "2", "--max_length", "64", "--eval_fraction", "0.25",
                   "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "out"), *QUICK], tmp_path)
    assert "36 training examples, 12 eval examples" in log and "patched LlamaForCausalLM" in log
    assert "'eval_loss'" in log


def _first_loss(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h][0]


def test_packing_matches_padding(tmp_path):
    """Padding-free batches (one flat row, per-example position_ids) give the same first loss as padded ones."""
    common = ["--max_steps", "1", "--per_device_train_batch_size", "6", "--offline_examples", "60", "--max_length", "64",
              "--sample_answers", "0", *QUICK]
    padded = finetune_alpaca.main([*common, "--output_dir", str(tmp_path / "pad")])
    packed = finetune_alpaca.main([*common, "--packing", "true", "--output_dir", str(tmp_path / "pack")])
    assert _first_loss(packed) == pytest.approx(_first_loss(padded), rel=1e-4)


def test_lora_checkpointing_and_resume(tmp_path):
    """LoRA + gradient checkpointing trains only the adapters; a run resumes from its checkpoint."""
    args = ["--lora_r", "4", "--lora_target_modules", "q_proj,v_proj", "--gradient_checkpointing", "true",
            "--offline_examples", "64", "--max_length", "64", "--sample_answers", "0", "--per_device_train_batch_size", "4",
            "--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "steps", "--save_steps", "2",
            "--logging_steps", "1", "--output_dir", str(tmp_path)]
    first = finetune_alpaca.main([*args, "--max_steps", "2"])
    assert is_patched(first.model) and type(first.model).__name__.startswith("Peft")
    assert (tmp_path / "checkpoint-2").is_dir() and (tmp_path / "adapter_model.safetensors").exists()
    resumed = finetune_alpaca.main([*args, "--max_steps", "3", "--resume_from_checkpoint", str(tmp_path / "checkpoint-2")])
    assert resumed.state.global_step == 3 and [h["step"] for h in resumed.state.log_history if "loss" in h][-1] == 3


def test_model_config_json_and_unpatchable_model(tmp_path):
    """--model_config with a local config.json builds that architecture; one cce_patch cannot patch is refused."""
    tok_dir = tmp_path / "tok"
    template = finetune_alpaca.PROMPT_WITH_INPUT + finetune_alpaca.PROMPT_NO_INPUT
    build_tokenizer(generate_dataset(200), template).save_pretrained(tok_dir)
    qwen = transformers.Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2)
    qwen.save_pretrained(tmp_path / "qwen")
    common = ["--tokenizer_name_or_path", str(tok_dir), "--dataset_name", "generated", "--offline_examples", "32",
              "--max_steps", "1", "--max_length", "64", "--output_dir", str(tmp_path / "out"), *QUICK, *CPU]
    trainer = finetune_alpaca.main(["--model_config", str(tmp_path / "qwen"), *common])
    assert type(trainer.model).__name__ == "Qwen2ForCausalLM" and is_patched(trainer.model)
    # ProphetNet's loss is an n-gram loss built on log_softmax: cce_patch refuses it rather than train a different loss
    transformers.ProphetNetConfig(vocab_size=300, hidden_size=32, encoder_ffn_dim=32, decoder_ffn_dim=32,
                                  num_encoder_layers=1, num_decoder_layers=1, num_encoder_attention_heads=2,
                                  num_decoder_attention_heads=2).save_pretrained(tmp_path / "prophetnet")
    with pytest.raises(SystemExit, match="cannot patch ProphetNetForCausalLM"):
        finetune_alpaca.main(["--model_config", str(tmp_path / "prophetnet" / "config.json"), *common])


@pytest.mark.skipif(not os.environ.get("CCE_SHARED_DATA"), reason="CCE_SHARED_DATA not set")
def test_real_alpaca_with_qwen_tokenizer(tmp_path):
    """A few steps on the real Alpaca sample, tokenized by the real Qwen2.5 tokenizer, on a tiny Qwen2 model
    with that vocabulary: the GPU smoke run's path (--model_config + tokenizer + local JSON), shrunk for CPU."""
    shared = Path(os.environ["CCE_SHARED_DATA"])
    tok = transformers.AutoTokenizer.from_pretrained(shared / "tokenizers" / "qwen2.5")
    config = transformers.Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    config.save_pretrained(tmp_path / "m")
    trainer = finetune_alpaca.main([
        "--model_config", str(tmp_path / "m"), "--tokenizer_name_or_path", str(shared / "tokenizers" / "qwen2.5"),
        "--dataset_path", str(shared / "alpaca_5000.json"), "--max_examples", "32", "--max_length", "96",
        "--max_steps", "3", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2",
        "--output_dir", str(tmp_path / "out"), *QUICK, *CPU,
    ])
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert is_patched(trainer.model) and trainer.model.config.vocab_size == len(tok)
    assert len(losses) == 3 and all(l == l for l in losses) and losses[-1] < losses[0]
