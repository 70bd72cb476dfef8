"""The package as pip installs it: a lean core that patches and trains alone, extras named when missing, one
version, a metadata build without warnings.

Why: ``pip install cce_patch`` used to pull datasets (pyarrow, pandas), peft and accelerate into every
environment though the op and ``patch()`` need none of them. The core is now torch, triton, transformers and
packaging; these tests keep it so: the declared list is checked, no module imports anything else at module
level, and a fresh interpreter with every optional package made unimportable patches a tiny model, trains it
with a plain torch loop and gets the Trainer flag's and TRL's missing-extra errors.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import cce_patch

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
#: The core's distributions -> the import names they provide.
CORE = {"torch": "torch", "triton": "triton", "transformers": "transformers", "packaging": "packaging"}
#: Packages an extra brings; the core-only interpreter below cannot import any of them. (pyyaml and tqdm, which
#: the recipes extra declares, stay: transformers and huggingface_hub depend on them, so every core has them.)
OPTIONAL = ("accelerate", "datasets", "peft", "trl", "deepspeed", "liger_kernel", "matplotlib", "pandas", "pyarrow")


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower()


def test_core_dependencies_are_the_lean_set():
    declared = {_name(r): r for r in PYPROJECT["project"]["dependencies"]}
    assert set(declared) == set(CORE), f"the core grew or shrank: {sorted(declared)}; optional packages go in extras"
    # the floors are versions that ran (README, Install): torch 2.11 + triton 3.6 on GPU, torch 2.13 on CPU
    assert declared["torch"].startswith("torch>=2.11") and declared["triton"].startswith("triton>=3.6")
    assert declared["transformers"] == "transformers>=4.57,<6"


def test_every_extra_the_errors_name_exists():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert {"trainer", "recipes", "peft", "trl", "deepspeed", "bench", "test"} <= set(extras)
    assert any(_name(r) == "accelerate" for r in extras["trainer"])
    assert {_name(r) for r in extras["recipes"]} >= {"accelerate", "datasets", "pyyaml", "tqdm"}


def _module_level_imports(path: Path) -> list[tuple[str, int]]:
    """Top-level names of the absolute imports that run when ``path`` is imported (not those in functions)."""
    found = []

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.extend((alias.name.split(".")[0], node.lineno) for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                found.append((node.module.split(".")[0], node.lineno))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue  # runs when called (a class body runs at import: visited below)
            else:
                for field in ("body", "orelse", "finalbody", "handlers"):
                    visit([n for n in getattr(node, field, []) if isinstance(n, ast.AST)])

    visit(ast.parse(path.read_text(), filename=str(path)).body)
    return found


def test_no_module_imports_an_optional_package_at_import_time():
    """Anything beyond the core is imported inside the function that needs it, so every module of the package
    imports in a core-only environment (the trainer integration then raises the missing-extra error itself)."""
    allowed = set(CORE.values()) | set(sys.stdlib_module_names) | {"cce_patch", "__future__"}
    wrong = [f"{path.relative_to(ROOT)}:{line}: {name}"
             for path in sorted((ROOT / "cce_patch").rglob("*.py")) if "__pycache__" not in path.parts
             for name, line in _module_level_imports(path) if name not in allowed]
    assert not wrong, "\n".join(wrong)


def test_the_version_has_one_source():
    assert "version" not in PYPROJECT["project"] and "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "cce_patch.__version__"}
    # a plain literal, which setuptools reads from the source without importing the package (and torch)
    tree = ast.parse((ROOT / "cce_patch" / "__init__.py").read_text())
    literals = [node.value.value for node in tree.body if isinstance(node, ast.Assign)
                and [getattr(t, "id", None) for t in node.targets] == ["__version__"]
                and isinstance(node.value, ast.Constant)]
    assert literals == [cce_patch.__version__]


def test_the_metadata_builds_without_warnings(tmp_path: Path):
    """setuptools' own backend on a copy of the project (what ``python -m build`` runs): the license as an SPDX
    expression, the version from ``cce_patch.__version__``, the lean core, and not one warning (the
    ``license = { text = ... }`` table used to print a deprecation). Run with every warning an error."""
    pytest.importorskip("setuptools.build_meta")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "cce_patch", tmp_path / "cce_patch", ignore=shutil.ignore_patterns("__pycache__"))
    code = textwrap.dedent("""
        import sys, warnings
        warnings.simplefilter("error")
        import setuptools.build_meta as backend
        print(backend.prepare_metadata_for_build_wheel(sys.argv[1]))
    """)
    (tmp_path / "meta").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-W", "error", "-c", code, str(tmp_path / "meta")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert not re.search(r"warn|deprecat", run.stderr, flags=re.I), run.stderr[-3000:]
    metadata = (tmp_path / "meta" / run.stdout.strip().splitlines()[-1] / "METADATA").read_text()
    headers = metadata.split("\n\n", 1)[0].splitlines()
    assert f"Version: {cce_patch.__version__}" in headers
    assert "License-Expression: Apache-2.0" in headers
    core = sorted(_name(h.split(": ", 1)[1]) for h in headers if h.startswith("Requires-Dist:") and "extra ==" not in h)
    assert core == sorted(CORE)


CORE_ONLY = """
import sys
OPTIONAL = {optional!r}
for name in OPTIONAL:  # as if not installed: `import name` raises ModuleNotFoundError, find_spec says None
    sys.modules[name] = None

import copy
import torch
import cce_patch
from cce_patch.integrations.extras import MissingExtraError
from models_tiny import batch, tiny_model

stock = tiny_model("llama")
model = cce_patch.patch(copy.deepcopy(stock))
assert cce_patch.is_patched(model)
ids, mask, labels = batch(b=4, t=16)
reference = stock(input_ids=ids, attention_mask=mask, labels=labels).loss
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
losses = []
for step in range(6):
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None  # the loss came from the fused op
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    losses.append(out.loss.item())
torch.testing.assert_close(torch.tensor(losses[0]), reference.detach(), rtol=1e-5, atol=1e-6)
assert losses[-1] < 0.8 * losses[0], losses

errors = {{}}
try:
    from cce_patch.integrations.trainer import CCECallback  # noqa: F401
except MissingExtraError as exc:
    errors["trainer"] = str(exc)
try:
    from cce_patch.integrations.trl import CCESFTConfig  # noqa: F401
except MissingExtraError as exc:
    errors["trl config"] = str(exc)
from cce_patch.integrations.trl import add_cce_fused_lm_head
try:
    add_cce_fused_lm_head(model)
except MissingExtraError as exc:
    errors["trl head"] = str(exc)
assert "pip install 'cce_patch[trainer]'" in errors.get("trainer", ""), errors
assert "pip install 'cce_patch[trl]'" in errors.get("trl config", "") == errors.get("trl head"), errors
loaded = sorted(n for n, m in sys.modules.items() if m is not None and n.split(".")[0] in OPTIONAL)
assert not loaded, loaded
print("core only:", [round(x, 4) for x in losses])
"""


def test_a_core_only_install_patches_and_trains():
    """No accelerate, datasets, peft, trl, deepspeed, liger-kernel, matplotlib, pandas or pyarrow: the
    patched model's first loss equals stock's and a few AdamW steps bring it down; the Trainer flag and the TRL
    integration say which extra to install."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), str(ROOT / "tests"),
                                                                    os.environ.get("PYTHONPATH")) if p)}
    run = subprocess.run([sys.executable, "-c", CORE_ONLY.format(optional=OPTIONAL)], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=600)
    assert run.returncode == 0 and "core only:" in run.stdout, run.stderr[-3000:]
