"""The rooms import one way, from the outer rooms down (README, "Layout"): ``ops`` (the op, no Hugging Face
code) <- ``config`` <- ``models`` <- ``integrations`` <- ``bench`` <- ``cli``; the package's facade
(``cce_patch/__init__.py``, which imports the inner rooms) only from ``bench`` and ``cli``, which use it as a
user does. Read from the source (every
``import`` statement, also those inside functions, which is where optional dependencies are imported), so a
new import that turns an arrow around fails here rather than as a circular import one day in a user's process.
Within a room, no two modules import each other: a pair that does is one concept split in two, or a shared
piece that belongs in one of them (or in a third module both import).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cce_patch"
#: Each room's rank: a module may import from rooms of its own rank or lower.
RANKS = {"ops": 0, "config": 1, "models": 2, "integrations": 3, "bench": 4, "cli": 5}
#: Third-party packages a room must not import, and why.
FORBIDDEN = {
    "ops": {"transformers", "peft", "trl", "accelerate", "deepspeed", "liger_kernel", "datasets"},  # the op alone
    "config": {"transformers", "peft", "trl", "accelerate", "deepspeed", "liger_kernel", "datasets"},
    "models": {"trl", "accelerate", "deepspeed", "datasets"},  # trainers and launchers are integrations
}
#: Pairs of modules that import each other today, each with the reason it is left; the test fails on any other
#: pair, and on a listed pair that no longer imports each other (then delete its line).
KNOWN_CYCLES: set[frozenset[str]] = set()  # bench/e2e's max_tokens <-> measure ended with step.py


def _room(module: tuple[str, ...]) -> str | None:
    """``("cce_patch", "ops", "api")`` -> ``"ops"``; the package's own ``__init__`` (the public facade) -> None."""
    if len(module) < 2:
        return None
    return module[1]


def _source_of(node: ast.ImportFrom, package: tuple[str, ...]) -> tuple[str, ...]:
    """The absolute module a ``from ... import`` statement in ``package`` reads from."""
    if not node.level:
        return tuple(node.module.split("."))
    base = package[: len(package) - node.level + 1]
    return base + tuple(node.module.split(".")) if node.module else base


def _imports(path: Path) -> list[tuple[tuple[str, ...], int]]:
    """(absolute dotted module as a tuple, line) for every import in ``path``."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    package = rel.parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(tuple(alias.name.split(".")), node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _source_of(node, package)
            if node.level and not node.module:  # "from . import x": x is a module of that package
                found += [(target + (alias.name,), node.lineno) for alias in node.names]
                continue
            found.append((target, node.lineno))
    return found


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_the_rooms_are_the_ones_named():
    rooms = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in _modules()} - {"__init__", "__main__"}
    assert rooms == set(RANKS), f"a room was added or renamed: give it a rank here and in the README: {rooms}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_from_the_outer_rooms_down(path: Path):
    own = _room(("cce_patch",) + path.relative_to(PACKAGE).with_suffix("").parts)
    if own is None or own in ("__init__", "__main__"):  # the facade and `python -m cce_patch` import any room
        return
    wrong = []
    for target, line in _imports(path):
        if target[0] == "cce_patch":
            room = _room(target)
            if room is not None and room in RANKS and RANKS[room] > RANKS[own]:
                wrong.append(f"line {line}: {own} imports {'.'.join(target)} ({room} is an outer room)")
            elif room is None and RANKS[own] < RANKS["bench"]:  # the benchmark and the CLI use it as users do
                wrong.append(f"line {line}: {own} imports the package facade (import the room itself)")
        elif target[0] in FORBIDDEN.get(own, ()):
            wrong.append(f"line {line}: {own} imports {target[0]}")
    assert not wrong, "\n".join(wrong)


def _module_name(path: Path) -> tuple[str, ...]:
    """``cce_patch/ops/api.py`` -> ``("cce_patch", "ops", "api")``; a package's ``__init__`` is the package."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imported_modules(path: Path, modules: set[tuple[str, ...]]) -> set[tuple[str, ...]]:
    """The package's modules that ``path`` imports by name, anywhere in it (``TYPE_CHECKING`` blocks and
    functions included): ``from .x import y`` names ``x.y`` where that is a module, else ``x``."""
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    named: list[tuple[str, ...]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            named += [tuple(alias.name.split(".")) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _source_of(node, package)
            named += [source + (a.name,) if source + (a.name,) in modules else source for a in node.names]
    found = set()
    for name in named:  # the longest prefix that is one of the package's modules (a function's name is not)
        module = next((name[:n] for n in range(len(name), 0, -1) if name[:n] in modules), None)
        if module is not None:
            found.add(module)
    return found - {_module_name(path)}


def _mutual_imports() -> set[frozenset[str]]:
    modules = {_module_name(p): p for p in _modules()}
    imported = {name: _imported_modules(path, set(modules)) for name, path in modules.items()}
    return {frozenset({".".join(a), ".".join(b)}) for a, targets in imported.items() for b in targets
            if a in imported[b]}


def test_no_two_modules_import_each_other():
    """Every pair of modules that import each other directly, wherever the import statements sit."""
    pairs = _mutual_imports()
    new = sorted(" <-> ".join(sorted(pair)) for pair in pairs - KNOWN_CYCLES)
    assert not new, "these modules import each other (move the shared piece to where it belongs):\n" + "\n".join(new)
    gone = sorted(" <-> ".join(sorted(pair)) for pair in KNOWN_CYCLES - pairs)
    assert not gone, "no longer import each other: delete these from KNOWN_CYCLES:\n" + "\n".join(gone)
