"""recipes/family_runs.py (the shipped recipe per family, six arms) and recipes/family_report.py, on CPU: every
shipped YAML is one the recipe accepts, with LoRA targets that exist in its family's architecture; the report of a
cut run; and, with the real data (CCE_SHARED_DATA), the dry run end to end through ``accelerate launch``."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import transformers
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
import alpaca_prompts  # noqa: E402
import family_report  # noqa: E402
import family_runs  # noqa: E402
import finetune_alpaca  # noqa: E402
import max_batch  # noqa: E402

SHIPPED = sorted(p for p in (ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_yaml_parses_with_the_recipe(path, tmp_path):
    script, train = finetune_alpaca.parse_args([str(path), "--output_dir", str(tmp_path), "--use_cpu", "true",
                                                "--bf16", "false"])
    raw = yaml.safe_load(path.read_text())
    assert script.max_length == raw.get("max_length", 512) and train.use_cce == raw.get("use_cce", True)


@pytest.mark.parametrize("name", sorted(family_runs.FAMILIES))
def test_family_yaml_lora_targets_exist_in_its_architecture(name, tmp_path):
    """The YAML's LoRA targets are module names of the family's architecture (built tiny, same module tree)."""
    family = family_runs.FAMILIES[name]
    assert (ROOT / family.yaml).is_file()
    raw = yaml.safe_load((ROOT / family.yaml).read_text())
    config = transformers.AutoConfig.from_pretrained(str(family_runs.tiny_config(family, tmp_path)))
    model = transformers.AutoModelForCausalLM.from_config(config)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    if raw.get("lora_r"):
        script, _ = finetune_alpaca.parse_args([str(ROOT / family.yaml), "--output_dir", str(tmp_path),
                                                "--use_cpu", "true", "--bf16", "false"])
        missing = set(script.lora_target_modules.split(",")) - names
        assert not missing, f"{family.yaml}: LoRA targets {missing} are not modules of {type(model).__name__}"
    else:
        assert family.full_fine_tune == "yaml"


def _log(path: Path, losses: list[float], seconds: list[float], torn: bool = False) -> None:
    rows = [{"start": True}]
    for i, (loss, s) in enumerate(zip(losses, seconds, strict=True), start=1):
        rows += [{"step": i, "seconds": s, "tokens_seen": 100 * i, "peak_gib": 1.0 + i / 10},
                 {"step": i, "loss": loss}]
    text = "\n".join(json.dumps(r) for r in rows) + "\n"
    path.write_text(text + ('{"step": 9, "secon' if torn else json.dumps({"done": True, "peak_gib": 2.5}) + "\n"))


def test_report_of_a_finished_and_a_cut_arm(tmp_path):
    family = tmp_path / "fam"
    family.mkdir()
    (family / "meta.json").write_text(json.dumps({"skip": 2}))
    _log(family / "stock.steps.jsonl", [3.0, 2.5, 2.0, 1.5], [9.0, 1.0, 2.0, 4.0])
    _log(family / "use_cce.steps.jsonl", [3.0, 2.6, 2.1], [5.0, 1.0, 1.0], torn=True)  # killed after step 3
    _log(family / "torch_compile.steps.jsonl", [3.0], [60.0], torn=True)
    with (family / "torch_compile.steps.jsonl").open("a") as f:  # the process failed; family_runs.py said so
        f.write("\n" + json.dumps({"run": {"arm": "torch_compile", "rc": 1, "command": []}}) + "\n")
    arms = family_report.family_report(family_report.collect([tmp_path])["fam"])
    stock, ours = arms["stock"], arms["use_cce"]
    assert stock["finished"] and not ours["finished"] and ours["steps"] == 3
    assert stock["first_step_s"] == 9.0 and stock["median_step_s"] == 3.0  # steps 3 and 4
    assert stock["tokens_per_s"] == pytest.approx(200 / 6.0) and stock["peak_gib"] == 2.5
    assert ours["vs_stock"]["max"] == pytest.approx(0.1) and ours["vs_stock"]["mean"] == pytest.approx(0.2 / 3)
    written = family_report.write_family(tmp_path, "fam", arms, {"skip": 2})
    md = (tmp_path / "fam.md").read_text()
    assert arms["torch_compile"]["error"] == "rc 1" and "| torch_compile (rc 1) | 1 |" in md
    assert "| use_cce (cut) | 3 |" in md and "0.1000 / 0.0667" in md and written[0].name == "fam.json"


@pytest.mark.skipif(not os.environ.get("CCE_SHARED_DATA"), reason="CCE_SHARED_DATA not set")
def test_dry_run_through_accelerate_launch(tmp_path):
    """Two arms of one family at tiny size, the real Alpaca sample and tokenizer, each through accelerate launch:
    the step logs, the family's JSON and table, and the two arms' curves equal (the loss alone differs)."""
    rc = family_runs.main(["--dry-run", "--family", "phi3.5-mini", "--steps", "2", "--data",
                           os.environ["CCE_SHARED_DATA"], "--out", str(tmp_path / "out"),
                           "--scratch", str(tmp_path / "scratch")])
    assert rc == 0
    data = json.loads((tmp_path / "out" / "phi3.5-mini.json").read_text())
    arms = data["arms"]
    assert set(arms) == {"stock", "use_cce"} and all(a["finished"] and a["steps"] == 2 for a in arms.values())
    assert arms["use_cce"]["run"]["rc"] == 0 and "--use_cce" in arms["use_cce"]["run"]["command"]
    assert arms["use_cce"]["vs_stock"]["max"] < 1e-3
    assert data["meta"]["tokenizer"] == "phi3-mini" and data["meta"]["notes"] == "-"
    assert (tmp_path / "out" / "phi3.5-mini.md").read_text().count("| use_cce |") == 1


@pytest.mark.skipif(not os.environ.get("CCE_SHARED_DATA"), reason="CCE_SHARED_DATA not set")
def test_stand_in_tokenizer_and_missing_chat_template_are_said(tmp_path):
    """Gemma 2 has no tokenizer in the shared data (Llama 3.1's stands in); Llama 3.1's carries no chat template,
    which its YAML asks for (the Alpaca prompt instead). Both are said, and the flag reaches the recipe."""
    data = Path(os.environ["CCE_SHARED_DATA"])
    tokenizer, note = family_runs.pick_tokenizer(family_runs.FAMILIES["gemma2-2b"], data)
    assert tokenizer.name == "llama3.1" and "gemma2 is not in" in note
    flags, why = family_runs.chat_template_override(family_runs.FAMILIES["llama3.1-8b"], tokenizer)
    assert flags == ["--use_chat_template", "false"] and "no chat template" in why
    qwen, _ = family_runs.pick_tokenizer(family_runs.FAMILIES["qwen2.5-7b"], data)
    assert family_runs.chat_template_override(family_runs.FAMILIES["qwen2.5-7b"], qwen) == ([], None)


# ---- the largest-batch probe (recipes/max_batch.py, family_runs.py --max-batch) ----

CAPTURED = ROOT / "tests" / "data" / "max_batch"


def _rule(largest: int, error_at: int | None = None, calls: list[int] | None = None):
    """A batch fits up to ``largest`` and runs out of memory above it (peak 1 + b/4 GiB); at ``error_at`` the run
    crashes instead. Records the batches asked, in order."""
    def fits(batch: int) -> max_batch.Outcome:
        if calls is not None:
            calls.append(batch)
        if batch == error_at:
            return max_batch.Outcome(max_batch.ERROR, detail="RuntimeError: boom")
        if batch <= largest:
            return max_batch.Outcome(max_batch.FITS, peak_gib=1 + batch / 4)
        return max_batch.Outcome(max_batch.OOM, detail="torch.OutOfMemoryError: CUDA out of memory.")
    return fits


@pytest.mark.parametrize("largest", [1, 2, 3, 7, 8, 9, 23, 64, 100, 129])
@pytest.mark.parametrize("start", [1, 4, 8, 200])
def test_search_finds_the_exact_largest_batch(largest, start):
    calls: list[int] = []
    result = max_batch.search_largest(_rule(largest, calls=calls), start=start)
    assert (result.largest, result.smallest_failing, result.bound) == (largest, largest + 1, "oom")
    assert result.peak_gib == 1 + largest / 4 and len(calls) == len(set(calls)), calls  # never the same batch twice
    assert calls[0] == start and [b for b, _ in result.tries] == calls
    span = max(largest, start)
    assert len(calls) <= 2 * span.bit_length() + 2  # doubling then bisection: logarithmic in the batch


def test_search_reports_batch_one_out_of_memory_as_none():
    result = max_batch.search_largest(_rule(0), start=8)
    assert (result.largest, result.smallest_failing, result.bound, result.peak_gib) == (0, 1, "none", None)
    assert [b for b, _ in result.tries] == [8, 4, 2, 1]


def test_search_stops_at_the_cap_and_says_it_was_the_cap():
    calls: list[int] = []
    result = max_batch.search_largest(_rule(1000, calls=calls), start=1, limit=12)
    assert (result.largest, result.smallest_failing, result.bound) == (12, None, "cap")
    assert calls == [1, 2, 4, 8, 12] and "not memory" in result.detail
    below = max_batch.search_largest(_rule(5), start=1, limit=12)  # memory ends it before the cap: the cap is silent
    assert (below.largest, below.bound) == (5, "oom")


def test_search_stops_at_a_crash_which_is_not_does_not_fit():
    calls: list[int] = []
    result = max_batch.search_largest(_rule(100, error_at=16, calls=calls), start=1)
    assert calls == [1, 2, 4, 8, 16] and (result.largest, result.smallest_failing, result.bound) == (8, None, "error")
    assert "batch 16: RuntimeError: boom" in result.detail
    timed_out = max_batch.search_largest(lambda b: max_batch.Outcome(max_batch.TIMEOUT if b > 2 else max_batch.FITS))
    assert (timed_out.largest, timed_out.bound) == (2, "timeout")


def test_search_tolerance_leaves_a_bracket_within_it():
    calls: list[int] = []
    result = max_batch.search_largest(_rule(150, calls=calls), start=8, rel_tol=1 / 16)
    assert result.bound == "oom" and result.largest <= 150 < result.smallest_failing
    assert result.smallest_failing - result.largest <= max(1, int(result.largest / 16))
    assert len(calls) < len(max_batch.search_largest(_rule(150), start=8).tries)


def _captured(name: str) -> str:
    return (CAPTURED / name).read_text()


def test_classify_a_crash_and_a_killed_child_as_errors():
    """Real stderr of the recipe through accelerate launch on CPU: an ImportError at model construction (after a
    chain of network errors: a broken setup, not the batch's answer), and a child the host's kernel killed with
    SIGKILL at batch 30000 (no Python exception at all: the machine's memory, not CUDA's, stops the search)."""
    kind, why = max_batch.classify(1, _captured("crash_accelerate.txt"))
    assert kind == max_batch.ERROR and why.startswith("ImportError: FlashAttention2")
    kind, why = max_batch.classify(1, _captured("host_killed_accelerate.txt"))
    assert kind == max_batch.ERROR and "no Python exception" in why and "SIGKILL" in why
    assert max_batch.classify(0, _captured("crash_accelerate.txt"))[0] == max_batch.FITS  # exit 0 decides
    assert max_batch.classify("timeout", "")[0] == max_batch.TIMEOUT


def test_a_run_that_exited_0_with_short_batches_does_not_fit(tmp_path):
    log = tmp_path / "c.steps.jsonl"
    rows = [{"start": True}, {"step": 1, "seconds": 1.0, "tokens_seen": 512, "peak_gib": 3.0},
            {"step": 2, "seconds": 1.0, "tokens_seen": 1024, "peak_gib": 3.5}, {"done": True, "peak_gib": 3.5}]
    log.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    read = max_batch.read_candidate_log(log)
    assert read["peak_gib"] == 3.5 and max_batch.check_full_steps(read, 2, 512) is None
    assert "not [640, 1280]" in max_batch.check_full_steps(read, 2, 640)
    assert "1 of 2 steps" in max_batch.check_full_steps({**read, "steps": read["steps"][:1]}, 2, 512)


def _search_lines(arm: str, batches: list[tuple[int, str]], result: dict | None) -> list[str]:
    rows = [{"arm": arm, "probe": {"measured": "rows of 1024", "device": "NVIDIA H100"}}]
    rows += [{"arm": arm, "candidate": {"batch": b, "kind": k, "peak_gib": b / 2 if k == "fits" else None}}
             for b, k in batches]
    if result is not None:
        rows.append({"arm": arm, "result": result})
    return [json.dumps(r) for r in rows]


def test_report_merges_the_largest_batch_with_the_arms(tmp_path):
    """Stock ended at an OOM bracket, use_cce at an OOM bracket (ratio exact), use_cce+torch_compile was cut
    (a lower bound, ">="), and an earlier search of stock in the same file is replaced by the later one."""
    family = tmp_path / "fam"
    family.mkdir()
    _log(family / "stock.steps.jsonl", [3.0, 2.5], [1.0, 1.0])
    lines = _search_lines("stock", [(8, "oom")], None)  # an earlier, abandoned search
    lines += _search_lines("stock", [(8, "fits"), (16, "oom"), (12, "fits"), (14, "oom"), (13, "oom")],
                           {"largest": 12, "smallest_failing": 13, "bound": "oom", "peak_gib": 6.0, "detail": None})
    lines += _search_lines("use_cce", [(8, "fits"), (16, "fits"), (32, "fits"), (64, "oom"), (48, "fits"),
                                       (56, "oom"), (52, "oom"), (50, "fits"), (51, "oom")],
                           {"largest": 50, "smallest_failing": 51, "bound": "oom", "peak_gib": 25.0, "detail": None})
    lines += _search_lines("use_cce+torch_compile", [(8, "fits"), (16, "fits"), (32, "fits")], None)
    (family / "max_batch.jsonl").write_text("\n".join(lines) + '\n{"arm": "use_cce", "resu')  # torn last line
    searches = family_report.collect_max_batch([tmp_path])["fam"]
    assert searches["stock"]["largest"] == 12 and len(searches["stock"]["candidates"]) == 5
    cut = searches["use_cce+torch_compile"]
    assert (cut["largest"], cut["bound"], cut["smallest_failing"], cut["peak_gib"]) == (32, "cut", None, 16.0)
    written = family_report.write_family(tmp_path, "fam", family_report.collect([tmp_path])["fam"], {"skip": 1},
                                         searches)
    data = json.loads(written[0].read_text())
    assert data["max_batch"]["use_cce"]["vs_stock"] == {"ratio": 50 / 12, "kind": "exact"}
    assert data["max_batch"]["use_cce+torch_compile"]["vs_stock"] == {"ratio": 32 / 12, "kind": "at least"}
    assert data["max_batch"]["stock"]["vs_stock"] is None and data["arms"]["stock"]["finished"]
    md = written[1].read_text()
    assert "| use_cce | 50 | 25.00 | 51 | oom | 4.17x |" in md and "| stock | 12 | 6.00 | 13 | oom | - |" in md
    assert "| use_cce+torch_compile | 32 | 16.00 | - | cut (" in md and ">= 2.67x" in md
    assert "| stock | 2 |" in md  # the arms' own table is still there


def test_no_ratio_where_stock_s_search_did_not_end_at_an_oom(tmp_path):
    family = tmp_path / "fam"
    family.mkdir()
    capped = {"largest": 4, "smallest_failing": None, "bound": "cap", "peak_gib": None, "detail": "fits at the cap"}
    (family / "max_batch.jsonl").write_text("\n".join(
        _search_lines("stock", [(4, "fits")], capped) + _search_lines("use_cce", [(4, "fits")], capped)) + "\n")
    searches = family_report.max_batch_ratios(family_report.collect_max_batch([tmp_path])["fam"])
    assert searches["use_cce"]["vs_stock"] is None
    assert "| use_cce | 4 | - | - | cap (fits at the cap) | - |" in family_report.markdown("fam", {}, {}, searches)


def test_full_length_rows_are_exact_rows_of_real_tokens():
    examples = [{"input_ids": list(range(10 * i, 10 * i + n)), "labels": [-100] * 2 + list(range(10 * i + 2, 10 * i + n)),
                 "attention_mask": [1] * n} for i, n in enumerate([5, 7, 3, 9])]  # 24 tokens
    rows = alpaca_prompts.full_length_rows(examples, 8, min_rows=5)
    assert len(rows) == 5 and all(len(r["input_ids"]) == len(r["labels"]) == sum(r["attention_mask"]) == 8 for r in rows)
    assert rows[0]["input_ids"] == [0, 1, 2, 3, 4, 10, 11, 12] and rows[0]["labels"] == [-100, -100, 2, 3, 4, -100, -100, 12]
    assert rows[3] == rows[0] and rows[4] == rows[1]  # repeated in order to reach min_rows
    with pytest.raises(ValueError, match="fewer than one row"):
        alpaca_prompts.full_length_rows(examples, 25)


@pytest.mark.skipif(not os.environ.get("CCE_SHARED_DATA"), reason="CCE_SHARED_DATA not set")
def test_max_batch_dry_run_end_to_end(tmp_path):
    """One family's search on CPU through accelerate launch with a cap of 2: each candidate a real recipe run at
    full-length rows, checked against its step log; the cap said as the cap; the report's table written."""
    rc = family_runs.main(["--dry-run", "--max-batch", "--family", "qwen2.5-7b", "--arms", "use_cce",
                           "--max-batch-limit", "2", "--data", os.environ["CCE_SHARED_DATA"],
                           "--out", str(tmp_path / "out"), "--scratch", str(tmp_path / "scratch")])
    assert rc == 0
    lines = [json.loads(line) for line in (tmp_path / "out" / "qwen2.5-7b" / "max_batch.jsonl").read_text().splitlines()]
    assert [r["candidate"]["batch"] for r in lines if "candidate" in r] == [1, 2]
    assert all(r["candidate"]["kind"] == "fits" for r in lines if "candidate" in r)
    assert lines[0]["probe"]["max_length"] == 64 and "rows of exactly 64" in lines[0]["probe"]["measured"]
    assert lines[-1]["result"]["bound"] == "cap" and lines[-1]["result"]["largest"] == 2
    data = json.loads((tmp_path / "out" / "qwen2.5-7b.json").read_text())
    assert data["max_batch"]["use_cce"]["bound"] == "cap"
    assert "| use_cce | 2 | - | - | cap (" in (tmp_path / "out" / "qwen2.5-7b.md").read_text()


def test_a_candidate_over_its_time_limit_is_killed_with_its_children(tmp_path):
    """The candidate's launcher starts the training process; at the time limit both go (an orphaned trainer would
    keep its GPU memory through the next candidate), and the outcome is a timeout, never an OOM."""
    pid_file = tmp_path / "grandchild.pid"
    grandchild = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    launcher = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {grandchild!r}])"
    outcome = max_batch.run_candidate([sys.executable, "-c", launcher], tmp_path / "none.jsonl", tmp_path / "c.log",
                                      2, 10, timeout=3)
    assert outcome.kind == max_batch.TIMEOUT and outcome.seconds < 30
    pid = int(pid_file.read_text())
    for _ in range(50):  # the kernel reaps it shortly after SIGKILL
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the training process {pid} outlived its candidate's time limit")
