"""``cce-patch e2e``'s Trainer-loop mode and ``--compile`` on CPU (tiny architecture; the numbers are not the
point, the plumbing and the agreement of the arms are), and the e2e package's import graph."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import torch

from cce_patch.bench.e2e.loop import LoopConfig, variable_batches
from cce_patch.cli import main as cli_main

E2E = Path(__file__).resolve().parents[1] / "cce_patch" / "bench" / "e2e"


def test_variable_batches_pad_to_the_longest_and_mask_prompts_and_padding():
    cfg = LoopConfig(steps=3, batch=4, min_len=5, max_len=20, seed=1)
    batches = variable_batches(100, cfg, torch.device("cpu"))
    assert len(batches) == 3
    for b in batches:
        lengths = b["attention_mask"].sum(1)
        assert b["input_ids"].shape[1] == int(lengths.max())  # padded to the batch's longest, no further
        assert bool(((lengths >= 5) & (lengths <= 20)).all())
        assert bool((b["labels"][b["attention_mask"] == 0] == -100).all())  # padding masked
        assert bool((b["labels"][:, 0] == -100).all())  # each prompt masked (at least its first token)
        kept = b["labels"] != -100
        assert bool(kept.any()) and bool((b["labels"][kept] == b["input_ids"][kept]).all())


def test_loop_and_compile_modes_on_a_tiny_model(tmp_path):
    rc = cli_main(["e2e", "--model", "tiny-llama", "--batch", "2", "--seq", "16", "--steps", "1", "--warmup", "0",
                   "--compile", "both", "--compile-backend", "aot_eager", "--loop-steps", "3", "--loop-warmup", "1",
                   "--loop-batch", "2", "--loop-len", "8-8", "--lr", "1e-3", "--out", str(tmp_path), "--no-png"])
    assert rc == 0
    data = json.loads((tmp_path / "e2e.json").read_text())
    by = {r["variant"]: r for r in data["results"]}
    assert list(by) == ["stock", "stock+compile", "ours", "ours+compile"]
    assert all(r["status"] == "ok" for r in by.values())
    assert by["ours+compile"]["compiled"] and not by["ours"]["compiled"]
    breaks = by["ours+compile"]["graph_breaks"]
    assert breaks["graphs"] == breaks["graph_breaks"] + 1 and len(breaks["reasons"]) <= breaks["graph_breaks"]
    stock = by["stock"]["loop"]["losses"]
    assert len(stock) == 3 and stock[0] != stock[-1]  # the optimizer stepped
    for r in by.values():  # every arm starts from the same weights and trains on the same batches
        assert r["loop"]["steps"] == 3 and r["loop"]["tokens_per_s"] > 0
        torch.testing.assert_close(torch.tensor(r["loop"]["losses"]), torch.tensor(stock), rtol=1e-4, atol=1e-4)
    md = (tmp_path / "e2e.md").read_text()
    assert "Trainer loop: 3 AdamW steps" in md and "graph breaks" in md


def test_no_two_e2e_modules_import_each_other():
    """The e2e modules' imports of each other (also inside functions) form no cycle."""
    graph: dict[str, set[str]] = {}
    for path in E2E.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(alias.name for alias in node.names)
        graph[path.stem] = found & {p.stem for p in E2E.glob("*.py")}
    assert graph["max_tokens"] and graph["measure"]  # the test sees real edges

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph.get(start, ()))

    cycles = sorted(m for m in graph if reaches(m, m, {m}))
    assert cycles == [], f"import cycle through {cycles}"
