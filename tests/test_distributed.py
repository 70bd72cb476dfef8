"""Multi-process training on 2 gloo ranks (CPU): every layout patched vs stock vs one process, the vocab-parallel
op vs the full op, and the recipe under torchrun with use_cce on and off.

Launches dominate the cost, so one torchrun launch runs every case of tests/distributed_cases.py (op, layouts and,
when deepspeed is installed, ZeRO) and writes one JSON per suite; the tests below read them. Each case asserts the
world size and the wrapper it ran under inside the worker (accelerate on CPU silently falls back to one process or
plain DDP), and the records carry those facts so the tests check them again here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from cce_patch import CCEConfig, is_patched

ROOT = Path(__file__).resolve().parents[1]
HAS_DEEPSPEED = sys.platform == "linux" and importlib.util.find_spec("deepspeed") is not None
NO_DEEPSPEED = "deepspeed is not installed (pip install deepspeed, DS_BUILD_OPS=0 on CPU; in the test extras on Linux)"
#: fp32 training on both sides: what differs is the order of a few sums (the stock loss vs our chunks, all-reduces)
FP32_LOSS, FP32_GRAD = 1e-5, 1e-5


def _env() -> dict[str, str]:
    return {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def torchrun(script: str, *args: str, timeout: int = 600) -> str:
    """Run ``script`` on 2 local ranks (``--standalone``: a free rendezvous port, so parallel runs do not clash)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / script), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    """One launch of every worker suite; {suite: its JSON}."""
    out = tmp_path_factory.mktemp("distributed")
    suites = ["op", "layouts"] + (["deepspeed"] if HAS_DEEPSPEED else [])
    torchrun("distributed_cases.py", ",".join(suites), str(out), str(out / "checkpoints"), timeout=900)
    found = {suite: json.loads((out / f"{suite}.json").read_text()) for suite in suites}
    for data in found.values():
        assert data["world_size"] == 2 and data["backend"] == "gloo", data
    return found


def _failures(cases: list[dict], check) -> list[str]:
    problems = []
    for case in cases:
        if "error" in case:
            problems.append(f"{case['name']}: {case['error']}\n{case.get('traceback', '')}")
            continue
        for problem in check(case):
            problems.append(f"{case['name']}: {problem}")
    return problems


def _layout_problems(case: dict) -> list[str]:
    """Patched == stock == one process, and the layout is the one the name says."""
    problems = []
    if case.get("world_size") != 2:
        problems.append(f"world size {case.get('world_size')}")
    if not case.get("patched_logits_none"):
        problems.append("the patched model returned logits: the CCE path did not run")
    if "bf16" in case["name"]:  # bf16 compute on both sides: ours must be as close to the fp32 run as stock is
        for quantity, slack in (("loss", 1e-4), ("grad", 1e-3), ("param", 1e-3)):
            ours, stock = case[f"{quantity}_patched_vs_single"], case[f"{quantity}_stock_vs_single"]
            if not ours <= 1.5 * stock + slack:
                problems.append(f"{quantity}: patched vs one fp32 process {ours:.2e}, stock {stock:.2e}")
        return problems + _wrapper_problems(case)
    for key in ("loss_patched_vs_stock", "loss_patched_vs_single", "loss_stock_vs_single"):
        if not case[key] <= FP32_LOSS:
            problems.append(f"{key} = {case[key]:.2e}")
    for key in ("grad_patched_vs_stock", "grad_patched_vs_single", "grad_stock_vs_single",
                "param_patched_vs_single", "param_stock_vs_single"):
        if not case[key] <= FP32_GRAD:
            problems.append(f"{key} = {case[key]:.2e} (worst gradient: {case['worst_grad']})")
    return problems + _wrapper_problems(case)


def _wrapper_problems(case: dict) -> list[str]:
    """The layout is the one the case's name says."""
    problems = []
    name, wrapper = case["name"], case.get("wrapper", "")
    expect_tied = "(tied)" in name and "untied" not in name
    if case.get("tied") != expect_tied:
        problems.append(f"tied head: {case.get('tied')}")
    if name.startswith("ddp") and wrapper != "DistributedDataParallel":
        problems.append(f"wrapper {wrapper}")
    if name.startswith("fsdp2"):
        if not wrapper.startswith("FSDP") or "Shard(dim=0),) local rows 80 of 160" not in case.get("head_layout", ""):
            problems.append(f"not sharded by FSDP2: {wrapper}, {case.get('head_layout')}")
        if ("lm_head alone" in name or "lm_head] grouped" in name) and not case["head_module"].startswith("FSDP"):
            problems.append(f"lm_head is not its own FSDP module: {case['head_module']}")
    if name.startswith("tp") and "Shard(dim=0),) local rows 80 of 160" not in case.get("head_layout", ""):
        problems.append(f"the head is not split over the vocabulary: {case.get('head_layout')}")
    if name.startswith("zero-"):
        stage = name[5]
        if f"(ZeRO-{stage})" not in wrapper:
            problems.append(f"wrapper {wrapper}")
        if stage == "3" and not case["head_weight"].startswith("partitioned: 0 of 5120"):
            problems.append(f"head not partitioned: {case['head_weight']}")
    return problems


def test_layouts_patched_equals_stock_and_one_process(results):
    """DDP, FSDP2 (per layer + root, root only, lm_head alone, grouped with the norm or the embedding; tied and
    untied; reshard_after_forward on/off; bf16 mixed precision; gradient accumulation) and tensor parallelism
    (parallelize_module, tp_plan="auto"), each after a plain ``cce_patch.patch(model)``: two SGD steps give the
    same losses, gradients and parameters patched, stock and in one process (fp32: to rounding; bf16: as close to
    the fp32 process as stock is)."""
    cases = [c for c in results["layouts"]["cases"] if "loss_patched_vs_stock" in c or "error" in c]
    names = " ".join(c["name"] for c in cases)
    for layout in ("ddp | llama", "ddp | qwen2 (tied)", "fsdp2 per layer + root", "root only", "lm_head alone, root",
                   "lm_head alone, reshard_after_forward=False", "[norm, lm_head]", "[embed_tokens, lm_head] grouped |",
                   "[embed_tokens, lm_head] grouped, root | qwen2 (tied)", "fsdp2 per layer + root | qwen2 (tied)",
                   "parallelize_module(lm_head)", "tp_plan='auto') | llama", "tp_plan='auto') | qwen2 (tied)",
                   "per layer + root, bf16", "lm_head alone, bf16", "accumulated micro-batches"):
        assert layout in names, f"layout {layout!r} missing from the suite"
    assert not (problems := _failures(cases, _layout_problems)), "\n".join(problems)


def test_torchtitan_fsdp2_layout_trains_with_patch_alone(results):
    """torchtitan's FSDP2 layout (fully_shard on each decoder layer, then on the head's group, then on the root):
    untied with ``lm_head`` in a group of its own (patched before and after the fully_shard calls), tied with the
    head grouped with the embedding. After ``cce_patch.patch(model)`` and nothing else, the loss, every gradient
    and every parameter equal stock's under the same layout and one process's on the whole batch. The groups are
    checked to be the ones named: the head's weight is not in the root's group."""
    cases = {c["name"]: c for c in results["layouts"]["cases"] if "torchtitan" in c["name"]}
    assert len(cases) == 3 and sum("before patch()" in name for name in cases) == 1, list(cases)
    assert not (problems := _failures(list(cases.values()), _layout_problems)), "\n".join(problems)
    for name, case in cases.items():
        layers = [f"model.layers.{i}" for i in range(case["decoder_layers"])]
        head_group = ["model.embed_tokens", "lm_head"] if case["tied"] else ["lm_head"]
        assert sorted(case["fsdp_modules"]) == sorted(["<root>", *layers, *head_group]), (name, case["fsdp_modules"])
        assert case["world_size"] == 2 and case["tied"] == ("(tied)" in name), case


@pytest.mark.skipif(not HAS_DEEPSPEED, reason=NO_DEEPSPEED)
def test_deepspeed_zero_patched_equals_stock_and_one_process(results):
    """ZeRO-2 and ZeRO-3 (head partitioned; built normally or under zero.Init; forward through the engine or
    engine.module; tied and untied), patched with apply_cce as the use_cce flag does, or (one ZeRO-3 case) with a
    plain patch(): no explicit registration of the head is needed, and nothing imports deepspeed.zero."""
    cases = results["deepspeed"]["cases"]
    assert {c["name"].split(" |")[0].split(" built")[0].split(",")[0] for c in cases} == {"zero-2", "zero-3"}
    assert {c.get("patched_with") for c in cases if c["name"].startswith("zero-3")} == {"apply_cce", "cce_patch.patch"}
    assert any("engine.module" in c["name"] for c in cases) and any("qwen2 (tied)" in c["name"] for c in cases)
    assert not (problems := _failures(cases, _layout_problems)), "\n".join(problems)


def _op_problems(case: dict) -> list[str]:
    bf16 = "bf16" in case["name"]
    vs_full, vs_fp64 = (1e-2, 1.5e-2) if bf16 else (1e-5, 2e-5)
    problems = [] if case.get("world_size", 2) == 2 else [f"world size {case.get('world_size')}"]
    for key, value in case.items():
        if key.endswith("_vs_full") and not value <= vs_full:
            problems.append(f"{key} = {value:.2e}")
        if key.endswith("_vs_fp64") and not value <= vs_fp64:
            problems.append(f"{key} = {value:.2e}")
    if case.get("finite") is False:
        problems.append("non-finite loss or gradient")
    if case.get("loss_is_zero") is False or case.get("dE_is_zero") is False:
        problems.append("an all-ignored batch must give a zero loss and zero gradients")
    if case.get("dC_is_none") is False:
        problems.append("a frozen head got a gradient")
    return problems


def test_vocab_parallel_op_matches_the_full_op(results):
    """Loss, LSE, dE, the local rows of dC and dbias against the full op and the fp64 oracle: plain tensors plus
    the group (even, uneven, explicit and empty shards) and Shard(0) DTensors (1-D and 2-D meshes, sequence-
    parallel hidden states); ignore_index, softcap, shift, label smoothing, z-loss, a rank owning no target,
    an all-ignored batch, a frozen head, bf16, and the Triton backend (interpreted here)."""
    cases = [c for c in results["op"]["cases"] if "raised" not in c]
    assert len(cases) >= 16, [c["name"] for c in cases]
    for needed in ("ignore_index=-1", "ignore_index=0", "softcap", "shift", "owns none", "every row ignored", "empty shard",
                   "triton", "label smoothing", "return_lse", "dtensor Shard(0)", "sequence-parallel", "2-D mesh",
                   "autocast"):
        assert any(needed in c["name"] for c in cases), needed
    assert not (problems := _failures(cases, _op_problems)), "\n".join(problems)


def test_vocab_parallel_refusals_name_the_layout(results):
    """Speed mode, softcap with smoothing, a head split over the hidden size, Partial placements, a hidden-split
    e, data-parallel inputs with a vocab-sharded weight, targets beyond the whole vocabulary, shards that do not
    tile it, and a local shard passed to the plain op: each a ValueError that says what is wrong; a second
    derivative: DoubleBackwardError, as for the one-device op."""
    cases = [c for c in results["op"]["cases"] if c["name"].startswith("refuse")]
    assert len(cases) == 11, [c["name"] for c in cases]
    problems = _failures(cases, lambda c: [] if c["raised"] and c["names_layout"] else [f"{c}"])
    assert not problems, "\n".join(problems)


RECIPE = ["--max_steps", "3", "--per_device_train_batch_size", "4", "--offline_examples", "64", "--max_length", "64",
          "--sample_answers", "0", "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1",
          "--disable_tqdm", "true", "--seed", "0"]


def test_recipe_under_torchrun_use_cce_on_and_off(tmp_path):
    """`torchrun --nproc_per_node 2 recipes/finetune_alpaca.py` (the offline default, shortened), use_cce on and
    off: 2 processes under DDP (asserted from inside the Trainer), the same loss at every step."""
    facts = {}
    for use_cce in ("true", "false"):
        out = tmp_path / f"cce_{use_cce}.json"
        torchrun("distributed_recipe.py", str(out), *RECIPE, "--use_cce", use_cce, "--output_dir",
                 str(tmp_path / f"run_{use_cce}"), timeout=600)
        facts[use_cce] = json.loads(out.read_text())
    for use_cce, fact in facts.items():
        assert fact["world_size"] == fact["trainer_world_size"] == 2, fact
        assert fact["distributed_type"] == "DistributedType.MULTI_CPU", fact
        assert fact["model_wrapped"] == "DistributedDataParallel", fact
        assert fact["patched"] is (use_cce == "true") and fact["global_step"] == 3, fact
        assert len(fact["step_seconds"]) == 3 and all(t > 0 for t in fact["step_seconds"]), fact
    on, off = facts["true"]["losses"], facts["false"]["losses"]
    assert len(on) == len(off) == 3
    assert on == pytest.approx(off, rel=1e-5), (on, off)


# ---------------------------------------------------------------------------------------------------------------
# In process: no process group needed
# ---------------------------------------------------------------------------------------------------------------


def test_apply_cce_with_deepspeed_imported(monkeypatch):
    """The use_cce flag used to crash at Trainer init whenever deepspeed had been imported (transformers imports
    it when installed): ``from deepspeed.zero import ...`` fails because ``deepspeed.zero`` is an attribute of the
    package, not an importable module. A stand-in package laid out that way pins it; ZeRO-3 needs no registration
    (test_deepspeed_zero_patched_equals_stock_and_one_process)."""
    from models_tiny import batch, tiny_model

    from cce_patch.integrations.trainer import apply_cce

    standin = types.ModuleType("deepspeed")
    standin.__path__ = []  # a package whose `zero` is only an attribute, as in deepspeed 0.16-0.19
    standin.zero = types.ModuleType("deepspeed.runtime.zero")
    monkeypatch.setitem(sys.modules, "deepspeed", standin)
    monkeypatch.delitem(sys.modules, "deepspeed.zero", raising=False)
    stock = tiny_model("llama")
    model = tiny_model("llama")
    apply_cce(model, config=CCEConfig(impl="torch"))
    assert is_patched(model)
    ids, mask, labels = batch()
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, labels=labels).loss,
                               stock(input_ids=ids, attention_mask=mask, labels=labels).loss)


def _module_state(model: torch.nn.Module) -> dict[str, tuple]:
    """Per module: its hooks of every kind (the hook objects themselves) and the names in its ``__dict__``."""
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
             "_state_dict_hooks", "_load_state_dict_pre_hooks")
    return {name: (tuple(tuple(getattr(m, kind).values()) for kind in kinds), tuple(sorted(vars(m))))
            for name, m in model.named_modules()}


def test_patch_and_unpatch_leave_no_hook_behind():
    """patch() gathers an FSDP2-sharded head at the head's call (models/sharding.py), so it installs no hook: the
    modules' hooks and attributes are the same after patch() and a training step, apart from the patch's own
    record on the model, and exactly the same after unpatch(); no global module hook appears either."""
    from models_tiny import batch, tiny_model
    from torch.nn.modules import module as module_globals

    import cce_patch

    model = tiny_model("llama")
    before = _module_state(model)
    global_hooks = (dict(module_globals._global_forward_hooks), dict(module_globals._global_forward_pre_hooks))
    cce_patch.patch(model)
    ids, mask, labels = batch()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    during = _module_state(model)
    own = {"forward", "_cce_config", "_cce_original_forward"}  # the patch record (models/state.py)
    assert during[""][0] == before[""][0] and set(during[""][1]) - set(before[""][1]) == own, during[""]
    assert {k: v for k, v in during.items() if k} == {k: v for k, v in before.items() if k}
    cce_patch.unpatch(model)
    assert _module_state(model) == before
    assert (dict(module_globals._global_forward_hooks), dict(module_globals._global_forward_pre_hooks)) == global_hooks


def test_prepare_sharded_training_is_a_harmless_name():
    """The names once needed for an FSDP2 head group of its own still run, on a patched and an unpatched model,
    return what they returned, install nothing and change no loss."""
    from models_tiny import batch, tiny_model

    import cce_patch
    from cce_patch.integrations.distributed import prepare_sharded_training, release_sharded_training

    model, stock = tiny_model("llama"), tiny_model("llama")
    cce_patch.patch(model)
    for target in (model, stock):
        before = _module_state(target)
        assert prepare_sharded_training(target) is target
        assert prepare_sharded_training(target) is target
        assert _module_state(target) == before
        release_sharded_training(target)
        assert _module_state(target) == before
    ids, mask, labels = batch()
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, labels=labels).loss,
                               stock(input_ids=ids, attention_mask=mask, labels=labels).loss)


def test_vocab_parallel_needs_a_process_group():
    import torch.distributed as dist

    from cce_patch.ops.vocab_parallel import vocab_parallel_linear_cross_entropy

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group exists in this process")
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        vocab_parallel_linear_cross_entropy(torch.randn(4, 8), torch.randn(5, 8), torch.zeros(4, dtype=torch.long))
