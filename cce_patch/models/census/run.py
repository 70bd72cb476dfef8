"""Run the census in forked children and write its table.

Each entry runs in its own forked process (a crash or a hang in one model type cannot take the run down; a
per-entry timeout), ``jobs`` at a time. The parent imports torch, transformers and the shared modeling code
once before forking, so children only import their own model's module.

    python -m cce_patch.models.census                  # print the table
    python -m cce_patch.models.census --write docs/models.md   # refresh the table between its markers
    python -m cce_patch.models.census llama mixtral    # some types only
"""

from __future__ import annotations

import dataclasses
import gc
import multiprocessing
import multiprocessing.connection
import os
import time
from collections.abc import Iterable

from .check import EXTRA_TYPES, PASS, REFUSED, UNBUILDABLE, WRONG, Result, model_class_name

BEGIN, END = "<!-- census:begin -->", "<!-- census:end -->"
ORDER = (PASS, REFUSED, UNBUILDABLE, WRONG)


def all_keys() -> list[str]:
    """Every causal-LM type of the installed transformers, then the extra vision-language classes."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    keys = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    for model_type, cls_name in EXTRA_TYPES.items():
        if hasattr(transformers, cls_name) and MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type) != cls_name:
            keys.append(f"{model_type}:{cls_name}")
    return keys


def _child(key: str, conn: multiprocessing.connection.Connection) -> None:
    import logging
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from .check import check_entry

    result = check_entry(key, report=lambda phase: conn.send(("phase", phase)))
    conn.send(("result", dataclasses.asdict(result)))
    conn.close()


def _preload() -> None:
    """What every child needs, imported once in the parent (fork shares it)."""
    import torch  # noqa: F401
    import transformers
    import transformers.modeling_utils  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401  (masking, rope, generation utilities)

    from .. import patching  # noqa: F401

    transformers.logging.set_verbosity_error()
    from .check import check_entry

    check_entry("llama")  # warms up torch (dispatch, autograd) once, not in every child
    gc.collect()
    gc.freeze()  # children do not copy the parent's pages just to scan them for garbage


def run(keys: Iterable[str] | None = None, jobs: int | None = None, timeout: float = 120.0,
        progress: bool = False) -> list[Result]:
    """The census of ``keys`` (default: :func:`all_keys`), in the order of ``keys``."""
    _preload()
    keys = list(keys) if keys is not None else all_keys()
    jobs = jobs or max(1, min(len(os.sched_getaffinity(0)), 8))
    ctx = multiprocessing.get_context("fork")
    pending = list(keys)
    running: dict[multiprocessing.connection.Connection, tuple] = {}
    results: dict[str, Result] = {}
    while pending or running:
        while pending and len(running) < jobs:
            key = pending.pop(0)
            parent, child = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, args=(key, child), daemon=True)
            proc.start()
            child.close()
            running[parent] = (proc, key, time.perf_counter(), ["starting"])
        ready = multiprocessing.connection.wait(list(running), timeout=0.5)
        for conn in ready:
            proc, key, started, phase = running[conn]
            try:
                kind, payload = conn.recv()
            except (EOFError, OSError):
                proc.join(5)
                results[key] = _lost(key, f"the child process died (exit code {proc.exitcode}) during {phase[0]}",
                                     phase[0], time.perf_counter() - started)
            else:
                if kind == "phase":
                    phase[0] = payload
                    continue
                results[key] = Result(**payload)
                proc.join(5)
            del running[conn]
            conn.close()
            if progress:
                print(_progress_line(results[key]), flush=True)
        now = time.perf_counter()
        for conn, (proc, key, started, phase) in list(running.items()):
            if now - started > timeout:
                proc.kill()
                proc.join(5)
                results[key] = _lost(key, f"timed out after {timeout:.0f} s during {phase[0]}", phase[0], now - started)
                del running[conn]
                conn.close()
                if progress:
                    print(_progress_line(results[key]), flush=True)
    return [results[k] for k in keys]


def _lost(key: str, reason: str, phase: str, seconds: float) -> Result:
    """A child that crashed or hung: unbuildable if stock was running, wrong if the patched model was."""
    status = WRONG if phase.startswith("patched") else UNBUILDABLE
    return Result(key, model_class_name(key), status, reason, seconds=seconds)


def _progress_line(r: Result) -> str:
    return f"{r.status:<11} {r.key:<32} {r.seconds:5.1f}s  {r.notes or r.reason}"[:200]


def counts(results: list[Result]) -> dict[str, int]:
    return {status: sum(r.status == status for r in results) for status in ORDER}


def markdown(results: list[Result], transformers_version: str) -> str:
    """The census table as docs/models.md holds it (no timings: the table changes only when results do)."""
    n = counts(results)
    causal = [r for r in results if ":" not in r.key]
    lines = [
        f"Census of transformers {transformers_version}: {len(causal)} causal-LM types "
        f"(`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`) and {len(results) - len(causal)} vision-language classes; "
        + ", ".join(f"{n[s]} {s}" for s in ORDER) + ".",
        "",
        "| model type | class | result | handled / reason |",
        "|---|---|---|---|",
    ]
    for r in results:
        model_type = r.key.split(":", 1)[0]
        detail = (r.notes if r.status == PASS else r.reason).replace("|", "\\|")
        lines.append(f"| `{model_type}` | `{r.model_class}` | {r.status} | {detail} |")
    return "\n".join(lines)


def write_table(path: str, table: str) -> None:
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{path} has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(f"{head}{BEGIN}\n{table}\n{END}{tail}")


def read_table(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip()


def main(argv: list[str] | None = None) -> int:
    import argparse

    import transformers

    parser = argparse.ArgumentParser(prog="python -m cce_patch.models.census", description=__doc__.split("\n\n")[0])
    parser.add_argument("keys", nargs="*", help="model types (default: all causal-LM types + extra VLM classes)")
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--write", metavar="MARKDOWN", help="replace the table between the census markers")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    results = run(args.keys or None, jobs=args.jobs, timeout=args.timeout, progress=True)
    table = markdown(results, transformers.__version__)
    if args.write:
        write_table(args.write, table)
    else:
        print(table)
    print(f"{counts(results)} in {time.perf_counter() - started:.0f} s")
    return 1 if counts(results)[WRONG] else 0
