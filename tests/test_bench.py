"""The benchmark as a product feature, on CPU: the CLI end to end at a tiny shape, the regimes' statistics,
the fp32 reference, failure isolation, and the e2e script on a tiny model. GPU-marked: the regimes match the
shared anchor generator bit for bit on CUDA (numbers compare with the published peers)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import cce_patch
from cce_patch.bench import methods as M
from cce_patch.bench.accuracy import fp32_ground_truth, rel_err
from cce_patch.bench.regimes import REGIMES, describe, make_inputs
from cce_patch.bench.runner import BenchConfig, Record, measure, run
from cce_patch.cli import main as cli_main

_ROOT = Path(__file__).resolve().parents[1]
# The shared anchor generator: beside the checkout here; carried in git-ignored .gpu_data/ to the GPU machine
# (tests/gpu/fetch_wheels.sh copies it); CCE_ANCHOR_REGIMES overrides both.
ANCHOR_REGIMES = next(
    (
        p
        for p in (
            Path(os.environ.get("CCE_ANCHOR_REGIMES", "/nonexistent")),
            _ROOT.parent / "shared" / "reference" / "regimes.py",
            _ROOT / ".gpu_data" / "reference" / "regimes.py",
        )
        if p.is_file()
    ),
    _ROOT.parent / "shared" / "reference" / "regimes.py",
)
HAS_MPL = importlib.util.find_spec("matplotlib") is not None


def test_cli_bench_tiny_writes_table_json_png(tmp_path, capsys):
    rc = cli_main(
        [
            "bench",
            "--preset",
            "tiny",
            "--device",
            "cpu",
            "--methods",
            "torch,ours,gemm,cce",
            "--out",
            str(tmp_path),
            "--name",
            "smoke",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "| method | N | D | V | regime |" in out and "cce-patch bench" in out
    data = json.loads((tmp_path / "smoke.json").read_text())
    env = data["environment"]
    for key in ("device", "torch", "triton", "transformers", "date", "command"):
        assert key in env
    assert env["device"].startswith("CPU") and "--preset tiny" in env["command"]
    res = data["results"]
    assert len(res) == 4 * len(REGIMES)
    for r in res:
        if r["method"] in ("torch", "ours"):
            assert r["status"] == {
                "fwd": "ok",
                "fwd_mem": "ok",
                "fwdbwd": "ok",
                "fwdbwd_mem": "ok",
                "errors": "ok",
            }
            assert r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0
            assert r["fwd_mb"] is None and r["fwdbwd_mb"] is None  # no allocator statistics on CPU
            assert (
                r["de_rel_err"] < 1e-5 and r["dc_rel_err"] < 1e-5 and r["loss_abs_err"] < 1e-4
            )  # fp32 inputs
        elif r["method"] == "gemm":
            assert r["fwd_ms"] > 0 and r["status"]["fwdbwd"].startswith("skipped")
        else:  # apple's CCE needs CUDA: reported as skipped, the run goes on
            assert r["status"]["all"].startswith("skipped") and r["fwd_ms"] is None
    md = (tmp_path / "smoke.md").read_text()
    assert md.count("\n| ours | 64 | 32 | 500 |") == len(REGIMES) and "n/a" in md
    assert "fwd+bwd ms flat / peaked / lm" in md  # the compact per-shape table, regimes side by side
    assert (tmp_path / "smoke.png").exists() == HAS_MPL


def test_cli_rejects_unknown_method_and_bad_shape(tmp_path):
    with pytest.raises(SystemExit, match="unknown method 'nope'"):
        cli_main(["bench", "--device", "cpu", "--methods", "torch,nope", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        cli_main(["bench", "--device", "cpu", "--shape", "12x3", "--out", str(tmp_path)])
    assert cli_main(["frobnicate"]) == 2


def test_method_specs_parse_options():
    assert M.parse_spec("ours") == ("ours", {})
    assert M.parse_spec("ours[mode=speed, chunk=4096, exact=True]") == (
        "ours",
        {"mode": "speed", "chunk": 4096, "exact": True},
    )
    assert M.split_specs("ours[a=1,b=2],torch, torch.compile") == ["ours[a=1,b=2]", "torch", "torch.compile"]
    assert M.parse_spec("ours[filter_eps=2^-12,mode=speed]") == ("ours", {"filter_eps": 2.0**-12, "mode": "speed"})
    with pytest.raises(ValueError, match="key=value"):
        M.parse_spec("ours[speed]")
    with pytest.raises(ValueError, match="takes no options"):
        M.build("torch[x=1]", torch.device("cpu"))
    m = M.build("ours[impl=torch,reduction='sum']", torch.device("cpu"))
    e, c, t = make_inputs("flat", 8, 4, 16, device="cpu", dtype=torch.float32)
    ref = F.cross_entropy((e @ c.T).double(), t, reduction="sum")
    assert torch.allclose(m.loss(e, c, t).double(), ref, rtol=1e-5)


TRL_PEERS = "trl,trl[outputs=entropy+is_top1],ours[outputs=entropy+is_top1],ours[outputs=log_probs]"


def test_cli_bench_trl_head_peers(tmp_path):
    """TRL's fused-head kernel and ours with the same per-token outputs, through the CLI on CPU: every phase
    runs, and their loss and gradients match the fp32 ground truth (the GPU run is the measurement)."""
    pytest.importorskip("trl.kernels.chunked_logprob")
    rc = cli_main(["bench", "--preset", "tiny", "--device", "cpu", "--methods", TRL_PEERS, "--out", str(tmp_path),
                   "--name", "trl"])
    assert rc == 0
    res = json.loads((tmp_path / "trl.json").read_text())["results"]
    assert {r["method"] for r in res} == set(M.split_specs(TRL_PEERS))
    assert len(res) == 4 * len(REGIMES)
    for r in res:
        assert all(s == "ok" for s in r["status"].values()), r["status"]
        assert r["de_rel_err"] < 1e-5 and r["dc_rel_err"] < 1e-5 and r["loss_abs_err"] < 1e-4, r
    described = {r["method"]: r["description"] for r in res}
    assert "ChunkedLogProbFunction" in described["trl"] and "'entropy', 'is_top1'" in described[
        "trl[outputs=entropy+is_top1]"]
    assert "linear_log_probs" in described["ours[outputs=entropy+is_top1]"]


def test_trl_head_methods_compute_the_same_loss():
    pytest.importorskip("trl.kernels.chunked_logprob")
    e, c, t = make_inputs("peaked", 40, 24, 300, device="cpu", dtype=torch.float32)
    losses = [M.build(s, torch.device("cpu")).loss(e, c, t) for s in M.split_specs(TRL_PEERS)]
    ref = F.cross_entropy((e @ c.T).double(), t)
    for loss in losses:
        assert torch.allclose(loss.double(), ref, rtol=1e-5)
    with pytest.raises(ValueError, match="takes only outputs"):
        M.build("trl[chunk=4]", torch.device("cpu"))
    with pytest.raises(ValueError, match="takes no"):
        M.build("ours[outputs=entropy,mode=speed]", torch.device("cpu"))


def test_regimes_statistics_cpu():
    n, d, v = 256, 256, 8192
    stats = {r: describe(*make_inputs(r, n, d, v, device="cpu", dtype=torch.float32)) for r in REGIMES}
    # flat: softmax close to uniform; peaked: a few columns per row; lm: the target gets real mass.
    assert stats["flat"]["entropy"] > 0.9 * math.log(v)
    assert stats["peaked"]["entropy"] < stats["flat"]["entropy"] - 3
    assert stats["peaked"]["frac_above_eps"] < 0.2 * stats["flat"]["frac_above_eps"]
    assert stats["lm"]["target_prob"] > 0.05 > 100 / v > stats["flat"]["target_prob"]
    assert stats["lm"]["entropy"] < 0.5 * stats["flat"]["entropy"]


def test_regimes_seeded_dtype_and_errors():
    a = make_inputs("lm", 64, 32, 1000, device="cpu", dtype=torch.float32, seed=3)
    b = make_inputs("lm", 64, 32, 1000, device="cpu", dtype=torch.float32, seed=3)
    c = make_inputs("lm", 64, 32, 1000, device="cpu", dtype=torch.float32, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=False)) and not torch.equal(a[0], c[0])
    e16, c16, t16 = make_inputs("lm", 64, 32, 1000, device="cpu", dtype=torch.bfloat16, seed=3)
    assert e16.dtype == c16.dtype == torch.bfloat16 and t16.dtype == torch.int64 and torch.equal(t16, a[2])
    assert torch.equal(e16, a[0].to(torch.bfloat16))  # fp32 math, cast at the end
    assert int(t16.min()) >= 0 and int(t16.max()) < 1000
    with pytest.raises(ValueError, match="unknown regime"):
        make_inputs("spiky", 4, 4, 4, device="cpu")


def _anchor_make():
    if not ANCHOR_REGIMES.exists():
        pytest.skip(f"{ANCHOR_REGIMES} not present")
    sys.path.insert(0, str(ANCHOR_REGIMES.parent))
    try:
        import regimes as anchor  # noqa: PLC0415
    finally:
        sys.path.pop(0)
    return anchor.make


@pytest.mark.parametrize("regime", REGIMES)
def test_regimes_match_anchor_generator_cpu(regime):
    make = _anchor_make()
    ref = make(regime, 96, 48, 3000, dev="cpu")
    ours = make_inputs(regime, 96, 48, 3000, device="cpu")
    assert all(torch.equal(x, y) for x, y in zip(ref, ours, strict=False))


@pytest.mark.gpu
@pytest.mark.parametrize("regime", REGIMES)
def test_regimes_match_anchor_generator_cuda(regime):
    make = _anchor_make()
    ref = make(regime, 1024, 2304, 32000, dev="cuda")
    ours = make_inputs(regime, 1024, 2304, 32000, device="cuda")
    assert all(torch.equal(x, y) for x, y in zip(ref, ours, strict=False))


def test_fp32_ground_truth_chunked_matches_autograd():
    e, c, t = make_inputs("peaked", 37, 24, 301, device="cpu", dtype=torch.float32, seed=1)
    e64 = e.double().requires_grad_(True)
    c64 = c.double().requires_grad_(True)
    loss = F.cross_entropy(e64 @ c64.T, t)
    loss.backward()
    ref = fp32_ground_truth(e, c, t, chunk_bytes=4 * 301 * 5)  # 5 rows a chunk: exercises the chunk loop
    assert abs(ref.loss - float(loss.detach())) < 1e-5
    assert rel_err(ref.de, e64.grad.float()) < 1e-5 and rel_err(ref.dc, c64.grad.float()) < 1e-5


def test_failures_are_recorded_not_raised():
    dev = torch.device("cpu")
    e, c, t = make_inputs("flat", 16, 8, 50, device="cpu", dtype=torch.float32)
    cfg = BenchConfig(shapes=[(16, 8, 50)], regimes=["flat"], methods=[], device=dev, dtype=torch.float32)

    def oom(e, c, t):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")

    def broken_backward(e, c, t):
        if e.requires_grad:
            raise RuntimeError("no backward here")
        return F.cross_entropy(e @ c.T, t)

    rec = measure(M.Method("oom", oom, ""), e, c, t, None, Record("oom", 16, 8, 50, "flat", "fp32"), cfg)
    assert rec.status["fwd"] == "OOM" and rec.status["fwdbwd"] == "OOM" and rec.fwd_ms is None
    rec = measure(
        M.Method("half", broken_backward, ""), e, c, t, None, Record("half", 16, 8, 50, "flat", "fp32"), cfg
    )
    assert rec.status["fwd"] == "ok" and rec.fwd_ms > 0
    assert rec.status["fwdbwd"].startswith("error: RuntimeError: no backward here")


def test_run_scaling_and_replot(tmp_path):
    cfg = BenchConfig(
        shapes=[(n, 16, 200) for n in (16, 32, 64)],
        regimes=["lm"],
        methods=["torch"],
        device=torch.device("cpu"),
        dtype=torch.float32,
        errors=False,
        cpu_repeats=1,
    )
    recs = run(cfg)
    assert [r.n for r in recs] == [16, 32, 64] and all(r.ok for r in recs) and recs[0].de_rel_err is None
    from cce_patch.bench.report import environment, write_all

    paths = write_all(tmp_path, "scaling", environment(cfg.device, ["x"]), {}, [r.__dict__ for r in recs])
    assert cli_main(["report", str(paths["json"]), "--out", str(tmp_path / "re")]) == 0
    assert (tmp_path / "re" / "scaling.md").read_text() == paths["md"].read_text()
    # Parts of one preset run over several calls merge into one table.
    assert (
        cli_main(["report", str(paths["json"]), str(paths["json"]), "--out", str(tmp_path), "--name", "m"])
        == 0
    )
    assert len(json.loads((tmp_path / "m.json").read_text())["results"]) == 6


def test_families_selection():
    from cce_patch.bench.__main__ import FAMILY_HEADS, build_parser, config_from_args

    args = build_parser().parse_args(["--device", "cpu", "--families", "phi3.5-mini,llama3.1-8b"])
    cfg = config_from_args(args)
    assert cfg.shapes == [(8192, *FAMILY_HEADS["phi3.5-mini"]), (8192, 3072 + 1024, 128256)]
    assert cfg.regimes == ["lm"]
    with pytest.raises(SystemExit, match="unknown families"):
        config_from_args(build_parser().parse_args(["--device", "cpu", "--families", "gpt5"]))


def test_e2e_tiny_model_stock_vs_patched(tmp_path):
    pytest.importorskip("transformers")
    rc = cli_main(["e2e", "--model", "tiny-llama", "--batch", "2", "--seq", "32", "--steps", "1", "--warmup", "0",
                   "--variants", "stock,patched", "--out", str(tmp_path), "--no-png"])
    data = json.loads((tmp_path / "e2e.json").read_text())
    stock, patched = data["results"]
    assert stock["variant"] == "stock" and stock["status"] == "ok"
    assert 0.5 * math.log(1000) < stock["loss"] < 2 * math.log(1000) and stock["step_ms"] > 0
    assert rc == 0 and patched["variant"] == "ours" and patched["status"] == "ok"  # "patched" is ours' old name
    assert patched["loss_rel_diff"] < 1e-4 and patched["grad_norm_rel_diff"] < 1e-3  # fp32 on CPU


def test_e2e_cli_with_liger_and_max_tokens_on_tiny_presets(tmp_path):
    """The whole `cce-patch e2e` on CPU: two tiny architectures, the Liger variants (reported as skipped: its
    kernels need CUDA), per-variant options, the max-tokens search up to a small cap, table + JSON + PNG."""
    pytest.importorskip("liger_kernel")
    rc = cli_main(["e2e", "--model", "tiny-llama", "--model", "tiny-gemma2", "--batch", "2", "--seq", "16",
                   "--steps", "1", "--warmup", "0", "--with-liger-kernels", "--max-tokens", "--max-tokens-cap", "96",
                   "--variants", "stock,ours,ours[mode=memory],liger,ours+liger", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "e2e.json").read_text())
    rows = {(r["model"], r["variant"]): r for r in data["results"]}
    assert set(rows) == {(m, v) for m in ("tiny-llama", "tiny-gemma2")
                         for v in ("stock", "ours", "ours[mode=memory]", "liger", "ours+liger")}
    for model in ("tiny-llama", "tiny-gemma2"):
        for variant in ("ours", "ours[mode=memory]"):
            r = rows[model, variant]
            assert r["status"] == "ok" and r["loss_rel_diff"] < 1e-4, r
        assert rows[model, "ours[mode=memory]"]["options"] == {"mode": "memory"}
        for variant in ("liger", "ours+liger"):
            assert rows[model, variant]["status"].startswith("skipped: Liger-Kernel's Triton kernels need a CUDA")
        for variant in ("stock", "ours"):
            m = rows[model, variant]["max_tokens"]
            assert m["bound"] == "cap" and m["tokens"] == 96 and m["batch"] == 6 and m["seq"] == 16
            assert [p["batch"] for p in m["probes"]][:2] == [1, 2] and all(p["fits"] for p in m["probes"])
    md = (tmp_path / "e2e.md").read_text()
    assert "| tiny-gemma2 | ours+liger |" in md and "Largest tokens per step" in md and "≥ 96" in md
    assert (tmp_path / "e2e.png").exists() == HAS_MPL
    with pytest.raises(SystemExit, match="unknown variant"):
        cli_main(["e2e", "--model", "tiny-llama", "--variants", "stock,ligr", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="takes no options"):
        cli_main(["e2e", "--model", "tiny-llama", "--variants", "stock[x=1]", "--out", str(tmp_path)])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            cli_main(["e2e", "--model", "tiny-llama", "--max-memory-gib", "8", "--out", str(tmp_path)])


def test_max_tokens_search_brackets_the_limit():
    """The search over the batch (a fake step that runs out of memory past a limit, with a linear peak): the
    answer is the largest fitting batch, bracketed within rel_tol, in few probes; the cap and the time budget
    end it early and say so."""
    from cce_patch.bench.e2e.max_tokens import Probe, largest_fitting

    def make(limit_batch: int, seconds_per_seq: float = 1.0):
        calls = []

        def probe(b: int) -> Probe:
            calls.append(b)
            fits = b <= limit_batch
            return Probe(b, fits, 10_000 + 1_000 * b if fits else None, seconds_per_seq * b)

        return probe, calls

    probe, calls = make(100)
    lo, hi, bound, probes = largest_fitting(probe, cap=1000, budget_s=1e9, rel_tol=1 / 32,
                                            limit_bytes=10_000 + 1_000 * 100 + 500)
    assert (lo, bound) == (100, "exact") and hi - lo <= max(1, lo // 32) and calls[:3] == [1, 2, 100]
    assert len(calls) <= 4
    probe, calls = make(100)  # the prediction overshoots (a real peak is not exactly linear): bisection closes it
    lo, hi, bound, _ = largest_fitting(probe, cap=1000, budget_s=1e9, limit_bytes=10_000 + 1_000 * 130)
    assert bound == "exact" and 97 <= lo <= 100 and hi <= 103 and len(calls) <= 10
    probe, calls = make(37)  # no memory statistics (CPU): doubling, then bisection
    lo, hi, bound, _ = largest_fitting(probe, cap=1000, budget_s=1e9, rel_tol=0.0)
    assert (lo, hi, bound) == (37, 38, "exact")
    probe, _ = make(10**6)
    assert largest_fitting(probe, cap=50, budget_s=1e9)[2] == "cap"
    probe, _ = make(0)
    assert largest_fitting(probe, cap=50, budget_s=1e9)[:3] == (0, 1, "none")
    probe, calls = make(10**6, seconds_per_seq=1.0)
    lo, _, bound, _ = largest_fitting(probe, cap=10**6, budget_s=20, clock=lambda: float(sum(calls)))
    assert bound == "time" and sum(calls) <= 20 and lo == max(calls)
    calls = []  # a peak that is not linear in the batch (stock Llama-3.1-8B on the H200: the gradients set it at
    # small batches, the logits at large ones): the prediction from batches 1 and 2 is far too high; after one
    # probe just below it, bisection, not a creep down in 6% steps

    def kinked_probe(b: int) -> Probe:
        calls.append(b)
        peak = max(30_000 + 10 * b, 10_000 + 4_400 * b)
        return Probe(b, peak <= 125_000, peak if peak <= 125_000 else None, 0.1 * b)

    lo, hi, bound, _ = largest_fitting(kinked_probe, cap=64, budget_s=1e9, limit_bytes=125_000)
    assert (lo, hi, bound) == (26, 27, "exact") and calls[:4] == [1, 2, 64, 60] and len(calls) <= 10
    one_time = []  # the first probe pays a one-time cost (kernel compilation at a new shape): not extrapolated

    def compiling_probe(b: int) -> Probe:
        one_time.append(b)
        return Probe(b, b <= 60, 10_000 + 1_000 * b if b <= 60 else None, 0.01 * b + (5.0 if len(one_time) == 1 else 0))

    lo, _, bound, _ = largest_fitting(compiling_probe, cap=1000, budget_s=8, limit_bytes=10_000 + 1_000 * 60)
    assert (lo, bound) == (60, "exact")


def test_liger_kernels_are_applied_and_undone():
    """build.liger_kernels puts Liger's kernels on one instance and restores the instance and the family's
    modeling module exactly (Liger changes both), so variants can follow each other on one model."""
    pytest.importorskip("liger_kernel")
    from transformers.models.llama import modeling_llama

    from cce_patch.bench.e2e.build import applied, build_model, liger_kernels, parse_variant
    from cce_patch.models.foreign_losses import detect_foreign_loss

    model = build_model("tiny-llama", torch.device("cpu"), torch.float32)
    module_before = dict(vars(modeling_llama))
    norm_forward = model.model.norm.forward
    with liger_kernels(model, fused_loss=True):
        assert modeling_llama.apply_rotary_pos_emb is not module_before["apply_rotary_pos_emb"]
        assert "liger_kernel" in model.model.norm.forward.__func__.__module__
        assert "Liger-Kernel" in detect_foreign_loss(model)
    assert dict(vars(modeling_llama)) == module_before
    assert "forward" not in model.__dict__ and model.model.norm.forward == norm_forward
    with applied(model, parse_variant("ours+liger[mode=speed]")):
        assert cce_patch.is_patched(model) and model._cce_config.mode == "speed"
        assert detect_foreign_loss(model) is None
    assert not cce_patch.is_patched(model) and dict(vars(modeling_llama)) == module_before


def test_cli_tf32_opt_in_is_recorded_and_scoped(tmp_path, tf32):
    """--tf32 turns on torch's TF32 switch for the run (every method, ours included, follows it) and the JSON
    records it; without the flag the run records the switch as it found it (off by default)."""
    tf32.set(False)
    args = ["bench", "--preset", "tiny", "--device", "cpu", "--dtype", "fp32", "--regimes", "lm",
            "--methods", "torch", "--no-png", "--out", str(tmp_path)]
    assert cli_main([*args, "--name", "plain"]) == 0
    assert json.loads((tmp_path / "plain.json").read_text())["config"]["tf32"] is False
    assert cli_main([*args, "--name", "tf32", "--tf32"]) == 0
    assert json.loads((tmp_path / "tf32.json").read_text())["config"]["tf32"] is True
    assert torch.backends.cuda.matmul.allow_tf32


def _head_block(md: str, head: str) -> dict[str, list[str]]:
    """The rows of one head's table in a bench .md, keyed by their N cell: ``{"64": [cells...]}`` plus the
    header under ``"N"``."""
    block = md.split(f"### {head}:", 1)[1].split("\n\n", 2)[1]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in block.splitlines()
            if line.startswith("|") and not line.startswith("|---")]
    return {row[0]: row for row in rows}


def test_cli_bench_heads_table_ratios_png(tmp_path, capsys):
    """A heads run on CPU through the CLI, at two small D x V heads and two N: the records come N-major and
    carry their head; each head's table has a fwd+bwd column per method run, the 3-GEMM floor and the ratios of
    ours to the baseline and to the floor, computed from the same records the JSON holds; a method that cannot
    run here (apple's CCE needs CUDA) is named under the table, not given a column; the PNG is drawn when
    matplotlib is installed."""
    rc = cli_main(["bench", "--heads", "32x500,48x300", "--n", "16,64", "--device", "cpu", "--no-errors",
                   "--methods", "ours,ours[mode=memory],torch,trl,cce,gemm", "--out", str(tmp_path), "--name", "h"])
    assert rc == 0
    data = json.loads((tmp_path / "h.json").read_text())
    cfg, res = data["config"], data["results"]
    assert cfg["heads"] == {"32x500": [32, 500], "48x300": [48, 300]} and cfg["baseline"] == "torch"
    assert cfg["fwd"] is False and "partial" not in cfg
    assert list(dict.fromkeys((r["n"], r["head"]) for r in res)) == [(16, "32x500"), (16, "48x300"),
                                                                     (64, "32x500"), (64, "48x300")]
    by = {(r["method"], r["n"], r["head"]): r for r in res}
    md = (tmp_path / "h.md").read_text()
    assert md in capsys.readouterr().out
    for head in ("32x500", "48x300"):
        rows = _head_block(md, head)
        assert rows["N"] == ["N", "ours", "ours[mode=memory]", "torch", "trl", "3-GEMM floor ms", "ours / torch ms",
                             "ours / torch MB", "ours / 3-GEMM floor"]
        for n in (16, 64):
            ours, torch_, gemm = (by[m, n, head] for m in ("ours", "torch", "gemm"))
            assert ours["status"] == {"fwd": "skipped: fwd+bwd only", "fwdbwd": "ok", "fwdbwd_mem": "ok"}
            assert gemm["status"]["fwd"] == "ok" and gemm["fwdbwd_ms"] is None  # the floor's unit: forward only
            floor = 3 * gemm["fwd_ms"]
            row = rows[str(n)]
            assert row[1] == f"{ours['fwdbwd_ms']:,.2f} / n/a" and row[3] == f"{torch_['fwdbwd_ms']:,.2f} / n/a"
            assert row[5:] == [f"{floor:,.2f}", f"{ours['fwdbwd_ms'] / torch_['fwdbwd_ms']:.2f}", "n/a",
                               f"{ours['fwdbwd_ms'] / floor:.2f}"]
        assert by["cce", 16, head]["status"]["all"].startswith("skipped")
    assert md.count("Not run: cce (skipped: cce needs a CUDA device).") == 2
    assert (tmp_path / "h.png").exists() == HAS_MPL


def test_heads_selection_and_preset():
    """--heads all and --preset heads: the seven heads (the families plus Gemma 3's and Qwen 3's) at N 2k, 8k,
    32k, N-major, lm regime, the heads methods, forward alone not timed; --n overrides the N sweep."""
    from cce_patch.bench.__main__ import HEADS, HEADS_METHODS_CPU, build_parser, config_from_args

    def cfg(*argv: str) -> BenchConfig:
        return config_from_args(build_parser().parse_args(["--device", "cpu", *argv]))

    assert HEADS["gemma3-4b"] == (2560, 262144) and HEADS["qwen3-8b"] == (4096, 151936) and len(HEADS) == 7
    every = cfg("--heads", "all")
    assert every.shapes == [(n, d, v) for n in (2048, 8192, 32768) for d, v in HEADS.values()]
    assert every.regimes == ["lm"] and every.methods == list(HEADS_METHODS_CPU) and every.fwd is False
    assert every.heads == {dv: name for name, dv in HEADS.items()}
    preset = cfg("--preset", "heads")
    assert (preset.shapes, preset.methods, preset.heads) == (every.shapes, every.methods, every.heads)
    some = cfg("--heads", "qwen3-8b,64x500", "--n", "4096", "--fwd", "--methods", "ours")
    assert some.shapes == [(4096, 4096, 151936), (4096, 64, 500)] and some.fwd and some.methods == ["ours"]
    for bad, why in ((["--heads", "gpt5"], "unknown head"), (["--heads", "12x"], "unknown head"),
                     (["--heads", "all", "--families", "phi3.5-mini"], "alternatives")):
        with pytest.raises(SystemExit, match=why):
            cfg(*bad)


def test_heads_run_records_a_real_oom_and_goes_on():
    """A head whose logits cannot be allocated (N = V = 2**24, D = 1: 4 PiB of fp32 logits, more than any
    address space, so the allocator refuses at once on every machine) is recorded as OOM in its cells, the
    run goes on to the next head, and the table says OOM where the numbers would be."""
    from cce_patch.bench.report import markdown_table
    from cce_patch.bench.runner import records_to_dicts

    huge, small = (2**24, 1, 2**24), (64, 8, 100)
    cfg = BenchConfig(shapes=[huge, small], regimes=["flat"], methods=["torch", "gemm"], device=torch.device("cpu"),
                      dtype=torch.float32, errors=False, cpu_repeats=1, fwd=False,
                      heads={(1, 2**24): "huge", (8, 100): "small"})
    seen: list[str] = []
    recs = run(cfg, on_record=lambda r: seen.append(r.head))
    assert seen == ["huge", "huge", "small", "small"]
    st = {(r.head, r.method): r.status for r in recs}
    assert st["huge", "torch"] == {"fwd": "skipped: fwd+bwd only", "fwdbwd": "OOM"}
    assert st["huge", "gemm"] == {"fwd": "OOM", "fwdbwd": "skipped: forward only"}
    assert st["small", "torch"]["fwdbwd"] == "ok" and st["small", "gemm"]["fwd"] == "ok"
    env = {"device": "CPU (test)", "command": "x"}
    md = markdown_table(records_to_dicts(recs), env, {"baseline": "torch"})
    assert _head_block(md, "huge")[f"{2**24:,}"] == [f"{2**24:,}", "OOM", "OOM"]
    small_row = _head_block(md, "small")["64"]
    assert small_row[1].endswith(" / n/a") and float(small_row[2]) > 0


def test_killed_heads_run_leaves_its_rows_in_json_and_md(tmp_path):
    """A heads run killed (SIGKILL, as a time limit does) in the middle of its largest cell: the JSON and the
    table already hold every record finished before it, each written whole after its record."""
    import signal
    import subprocess
    import time

    out = tmp_path / "out"
    # The last cell, ours at 4096 x 256 x 200000 on CPU, takes minutes: the run is killed inside it.
    cmd = [sys.executable, "-m", "cce_patch.bench", "--heads", "16x100,256x200000", "--n", "16,4096", "--device",
           "cpu", "--methods", "ours,torch", "--no-errors", "--no-png", "--out", str(out), "--name", "k"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    results: list = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "k.json").exists():
                results = json.loads((out / "k.json").read_text())["results"]
                if len(results) >= 6:  # (16, both heads) and (4096, the small head): 3 shapes x 2 methods
                    break
            time.sleep(0.2)
        assert proc.poll() is None, f"the run ended before it was killed: {proc.stderr.read().decode()[-2000:]}"
        assert len(results) >= 6, "no checkpoint of 6 records within 240 s"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    data = json.loads((out / "k.json").read_text())
    assert data["config"]["partial"] is True
    done = {(r["head"], r["n"]) for r in data["results"]}
    assert done == {("16x100", 16), ("256x200000", 16), ("16x100", 4096)}
    md = (out / "k.md").read_text()
    assert "(partial: 6 records when written" in md
    assert set(_head_block(md, "16x100")) == {"N", "16", "4,096"} and set(_head_block(md, "256x200000")) == {"N", "16"}
    for (head, n) in done:
        row = _head_block(md, head)[f"{n:,}"]
        assert all(cell.endswith(" / n/a") for cell in row[1:3]), row
