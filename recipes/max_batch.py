"""The largest per-device batch of the shipped recipe that trains without running out of device memory.

What is measured: ``per_device_train_batch_size`` at the YAML's ``max_length``, every batch the worst case,
``batch x max_length`` real Alpaca tokens (the recipe's ``--full_length_rows``: examples concatenated and cut
into full rows, no padding, labels as the recipe makes them), everything else as the YAML says (gradient
accumulation, gradient checkpointing, LoRA or full fine-tuning, bf16). A candidate batch runs ``steps``
optimizer steps (default 2: the second step's forward already holds the optimizer states, so its peak is the
steady state's) in a process of its own (``accelerate launch``), so that an OOM, or the fragmented allocator it
leaves, cannot touch the next candidate; it "fits" when the process finishes those steps with every step at
``batch x accumulation x max_length`` tokens (read back from its step log).

The search (``search_largest``): from ``start`` the batch doubles while it fits, then the bracket between the
largest that fit and the smallest that ran out of memory is bisected (to one sequence, or to ``rel_tol`` of the
batch). It assumes what is true of a training step at a fixed length: if a batch fits, every smaller one does.
Only a CUDA out-of-memory error counts as "does not fit" (``classify``: the child's last exception, from its
stderr); any other failure (a crash, a bug, a killed process, a batch that came out short) and a candidate over
its time limit stop the search with that error: the largest batch found so far is then a lower bound, said so.
A ``limit`` caps the search (the CPU dry run, where nothing runs out of memory): reaching it is reported as the
cap, never as a memory limit.

Why not ``cce_patch.bench.e2e.max_tokens.largest_fitting``: that search probes one training step inside its own
process (it can catch the OOM and go on); here a candidate is a whole recipe run in a child process, whose
outcome is one of three (fits, OOM, error) and whose failures are told apart from its stderr. Its ideas are kept:
the monotone assumption, the bound that ended the search said with the answer (``oom`` / ``cap`` / ``none``).

Every candidate's outcome is appended to a JSON-lines file as it ends (``{"candidate": ...}``), and the arm's
answer closes it (``{"result": ...}``), so a run killed mid-search keeps what it found (``family_report.py``
reads both). ``family_runs.py --max-batch`` runs this per family and arm.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

#: What a candidate's run came to: it fits; CUDA ran out of memory; it failed otherwise (stops the search); or it
#: ran past its time limit (stops the search: slow is not out of memory)
FITS, OOM, ERROR, TIMEOUT = "fits", "oom", "error", "timeout"


@dataclass(frozen=True)
class Outcome:
    """One candidate batch's run: ``kind`` (one of the four above), its peak memory (GiB, when it fits on a GPU),
    seconds of the whole process, and a line that says why (the exception, or what was wrong)."""

    kind: str
    peak_gib: float | None = None
    seconds: float | None = None
    detail: str | None = None


@dataclass
class SearchResult:
    """The answer. ``largest``: the largest batch that fit (0: none did). ``smallest_failing``: the smallest that
    ran out of memory (None: none did). ``bound`` says what ended the search: ``oom`` (fits at ``largest``, out of
    memory at ``smallest_failing``, which is within ``rel_tol`` of it), ``none`` (batch 1 ran out of memory), ``cap``
    (fits at the cap: the cap ended it, not memory), ``error`` / ``timeout`` (a candidate failed otherwise or ran
    too long: ``largest`` is a lower bound). ``tries``: (batch, outcome) in the order run."""

    largest: int
    smallest_failing: int | None
    bound: str
    peak_gib: float | None
    tries: list[tuple[int, Outcome]] = field(default_factory=list)
    detail: str | None = None

    def to_json(self) -> dict:
        return {"largest": self.largest, "smallest_failing": self.smallest_failing, "bound": self.bound,
                "peak_gib": self.peak_gib, "detail": self.detail,
                "tries": [{"batch": b, **asdict(o)} for b, o in self.tries]}


def search_largest(fits: Callable[[int], Outcome], start: int = 1, limit: int | None = None,
                   rel_tol: float = 0.0) -> SearchResult:
    """The largest batch in ``[1, limit]`` for which ``fits`` says FITS: doubling from ``start`` while it fits,
    then bisecting the bracket until the smallest OOM is within ``max(1, rel_tol * largest)`` of the largest fit
    (``rel_tol=0``: the exact largest). Assumes a batch fits whenever a larger one does; a batch is never tried
    twice. An ERROR or TIMEOUT outcome ends the search at once (see ``SearchResult``)."""
    if start < 1 or (limit is not None and limit < 1):
        raise ValueError(f"start and limit must be positive, not {start} and {limit}")
    start = min(start, limit) if limit is not None else start
    lo, hi = 0, None  # the largest that fit (0: none yet), the smallest that ran out of memory
    peaks: dict[int, float | None] = {}
    tries: list[tuple[int, Outcome]] = []

    def answer(bound: str, detail: str | None = None) -> SearchResult:
        return SearchResult(lo, hi, bound, peaks.get(lo), tries, detail)

    b = start
    while True:
        outcome = fits(b)
        tries.append((b, outcome))
        if outcome.kind == FITS:
            lo, peaks[b] = b, outcome.peak_gib
        elif outcome.kind == OOM:
            hi = b
        elif outcome.kind in (ERROR, TIMEOUT):
            return answer(outcome.kind, f"batch {b}: {outcome.detail or outcome.kind}")
        else:
            raise ValueError(f"unknown outcome {outcome.kind!r} for batch {b}")
        if hi is None:  # still doubling
            if limit is not None and lo >= limit:
                return answer("cap", f"fits at the cap of {limit}: the cap ended the search, not memory")
            b = 2 * lo if limit is None else min(2 * lo, limit)
            continue
        if hi == 1:
            return answer("none", "batch 1 runs out of memory")
        if hi - lo <= max(1, int(lo * rel_tol)):
            return answer("oom", None if hi - lo == 1 else f"resolution: out of memory at {hi}, {hi - lo - 1} "
                                                             "batches between not tried")
        b = (lo + hi) // 2


#: The child's exception lines: ``Name: message`` or a bare ``Name`` at the start of a line, after a traceback.
_EXCEPTION_LINE = re.compile(r"^(?P<name>[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt))(?::\s?(?P<message>.*))?$")
#: What the launcher raises when its child fails: never the child's reason
_LAUNCHER = ("subprocess.CalledProcessError", "CalledProcessError")
_OOM_NAMES = ("torch.OutOfMemoryError", "torch.cuda.OutOfMemoryError", "OutOfMemoryError")
_OOM_MESSAGES = ("CUDA out of memory", "CUDA error: out of memory")


def child_exception(stderr: str) -> tuple[str, str] | None:
    """(exception name, message) that ended the recipe's process: the last traceback's exception line that is not
    the launcher's ``CalledProcessError`` (``accelerate launch`` prints the child's traceback, then its own).
    With chained exceptions ("During handling of the above exception ...") the last one is what propagated."""
    lines = stderr.splitlines()
    found: tuple[str, str] | None = None
    in_traceback = False
    for line in lines:
        if "Traceback (most recent call last)" in line:  # also rich's boxed header (no colon)
            in_traceback = True
            continue
        if not in_traceback or line.startswith((" ", "\t")) or not line.strip():
            continue
        match = _EXCEPTION_LINE.match(line.strip())
        if match:
            in_traceback = False
            name = match["name"]
            if name not in _LAUNCHER:
                found = (name, (match["message"] or "").strip())
    return found


def classify(returncode: int | str, stderr: str) -> tuple[str, str]:
    """(FITS / OOM / ERROR / TIMEOUT, why) of a finished candidate process from its exit code and stderr. OOM only
    for CUDA's: the child's last exception is ``torch.OutOfMemoryError`` (``torch.cuda.OutOfMemoryError``) or its
    message says CUDA ran out of memory (a driver or library allocation: ``CUDA error: out of memory``). A host
    killed by the kernel's OOM killer, Triton's ``OutOfResources`` (shared memory: a kernel's configuration) and
    any other failure are errors. Exit 0 is FITS here; whether the run did its steps in full is the caller's
    check (the step log)."""
    if returncode == "timeout":
        return TIMEOUT, "ran past its time limit"
    if returncode == 0:
        return FITS, "finished"
    exc = child_exception(stderr)
    if exc is None:
        tail = " | ".join(line.strip() for line in stderr.strip().splitlines()[-3:])
        return ERROR, f"exit {returncode} with no Python exception in stderr" + (f": {tail}" if tail else "")
    name, message = exc
    text = f"{name}: {message}" if message else name
    if name in _OOM_NAMES or any(m in message for m in _OOM_MESSAGES):
        return OOM, text[:400]
    return ERROR, text[:400]


def read_candidate_log(path: Path) -> dict:
    """A candidate's step log (``timed_finetune.py``): its steps' tokens seen and peak memory, and whether it ended."""
    steps, done = [], None
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("done"):
                done = row
            elif "seconds" in row and "step" in row:
                steps.append(row)
    peaks = [r["peak_gib"] for r in steps if r.get("peak_gib") is not None]
    if done and done.get("peak_gib") is not None:
        peaks.append(done["peak_gib"])
    return {"steps": steps, "done": done is not None, "peak_gib": max(peaks) if peaks else None}


def check_full_steps(log: dict, steps: int, tokens_per_step: int) -> str | None:
    """Why a run that exited 0 does not count as fitting (None: it does): it must have done ``steps`` optimizer
    steps, each of exactly ``tokens_per_step`` input tokens (batch x accumulation x max_length: no short batch)."""
    if not log["done"] or len(log["steps"]) != steps:
        return f"the step log holds {len(log['steps'])} of {steps} steps" + ("" if log["done"] else ", no end")
    seen = [r["tokens_seen"] for r in log["steps"]]
    expected = [tokens_per_step * (i + 1) for i in range(steps)]
    if seen != expected:
        return f"tokens seen per step {seen}, not {expected}: a batch was not batch x max_length tokens"
    return None


def run_candidate(command: list[str], step_log: Path, stderr_path: Path, steps: int, tokens_per_step: int,
                  timeout: float | None, env: dict[str, str] | None = None, cwd: Path | None = None) -> Outcome:
    """Run one candidate's recipe ``command`` (which writes ``step_log``) in its own process; its stdout and
    stderr go to ``stderr_path`` (classified afterwards; the file stays for a human)."""
    step_log.unlink(missing_ok=True)
    stderr_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with stderr_path.open("w") as err:
        # a session of its own: over the time limit the whole group goes (the launcher and the training process
        # it started), else the orphaned trainer would keep its GPU memory through the next candidate
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=err, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc: int | str = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = "timeout"
    seconds = round(time.perf_counter() - t0, 1)
    kind, detail = classify(rc, stderr_path.read_text(errors="replace"))
    log = read_candidate_log(step_log)
    if kind == FITS:
        short = check_full_steps(log, steps, tokens_per_step)
        if short:
            kind, detail = ERROR, short
    return Outcome(kind, log["peak_gib"] if kind == FITS else None, seconds, detail)


def probe_arm(command_for: Callable[[int], tuple[list[str], Path]], results: Path, arm: str, header: dict,
              steps: int, tokens_per_batch_row: int, work: Path, start: int = 1, limit: int | None = None,
              rel_tol: float = 0.0, timeout: float | None = None, env: dict[str, str] | None = None,
              cwd: Path | None = None, on_candidate: Callable[[], None] | None = None) -> SearchResult:
    """The search for one arm: ``command_for(batch)`` gives the candidate's recipe command and the step log it
    writes; ``tokens_per_batch_row`` is accumulation x max_length (a step's tokens per unit of batch). Appends to
    ``results``: a ``{"probe": header}`` line, one ``{"candidate": ...}`` line per run, the ``{"result": ...}``
    line; ``on_candidate`` is called after each line (the report is rewritten)."""
    results.parent.mkdir(parents=True, exist_ok=True)

    def append(row: dict) -> None:
        with results.open("a") as f:
            f.write(json.dumps({"arm": arm, **row}) + "\n")
        if on_candidate is not None:
            on_candidate()

    append({"probe": header})

    def fits(batch: int) -> Outcome:
        command, step_log = command_for(batch)
        print(f"[max-batch {arm}] batch {batch}: {' '.join(command)}", flush=True)
        outcome = run_candidate(command, step_log, work / f"{arm}.b{batch}.log", steps,
                                batch * tokens_per_batch_row, timeout, env, cwd)
        print(f"[max-batch {arm}] batch {batch}: {outcome.kind} in {outcome.seconds} s"
              + (f", peak {outcome.peak_gib} GiB" if outcome.peak_gib is not None else "")
              + (f" ({outcome.detail})" if outcome.kind != FITS else ""), flush=True)
        append({"candidate": {"batch": batch, **asdict(outcome), "log": str(work / f"{arm}.b{batch}.log")}})
        return outcome

    result = search_largest(fits, start=start, limit=limit, rel_tol=rel_tol)
    append({"result": {k: v for k, v in result.to_json().items() if k != "tries"}})
    return result

