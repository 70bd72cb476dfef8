"""The model under ``torch.compile``, as ``TrainingArguments(torch_compile=True)`` has it (accelerate calls
``torch.compile(model)``): the decoder traced by dynamo, and, on a patched model, our loss reached as the custom
op it is registered as. What the benchmark reports about it is where dynamo breaks the graph and how often per
step, from ``torch._dynamo.explain`` on one forward of the model as it is (a variant applied)."""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger("cce_patch.bench")

#: reasons kept per record (each break site is named once)
MAX_REASONS = 12


def compile_model(model: torch.nn.Module, backend: str = "inductor") -> torch.nn.Module:
    """``torch.compile(model)`` after forgetting what dynamo compiled before (another variant's forward)."""
    torch._dynamo.reset()
    return torch.compile(model, backend=backend)


def graph_breaks(model: torch.nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
    """Graphs and graph breaks of one forward of ``model`` (uncompiled; dynamo traces it here without running a
    backend), with each break's reason as dynamo counts them (``torch._dynamo.utils.counters``: recent torch
    leaves ``explain``'s own ``break_reasons`` empty). A loss that dynamo cannot trace shows up here as a break
    in the patched forward; the count is per forward, so per training step."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    try:
        explanation = torch._dynamo.explain(model)(**inputs)
    except Exception as exc:  # noqa: BLE001 - the report says why; the timed steps still run compiled
        log.warning("torch._dynamo.explain failed: %s", exc)
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        torch._dynamo.reset()
    reasons = [f"{n}x {_short(reason)}" for reason, n in counters["graph_break"].most_common(MAX_REASONS)]
    return {"graphs": explanation.graph_count, "graph_breaks": explanation.graph_break_count, "reasons": reasons}


def _short(reason: str) -> str:
    """A dynamo break reason's first line and its "Developer debug context" (what was being traced)."""
    lines = [line.strip() for line in str(reason).splitlines() if line.strip()]
    context = next((line for line in lines if line.startswith("Developer debug context")), "")
    return f"{lines[0][:160] if lines else '?'}{' - ' + context[:200] if context else ''}"
