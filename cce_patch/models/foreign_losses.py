"""Other libraries' fused losses on a model: which one is installed, where, and whether it or ours runs.

Liger-Kernel's ``apply_liger_kernel_to_<family>()`` (and ``AutoLigerKernelForCausalLM``) installs, by default,
its own fused linear cross-entropy as the ``*ForCausalLM.forward``: on the class, or on one instance when
given ``model=``. Its other kernels (RMSNorm, SwiGLU/GeGLU, RoPE) replace modules and functions inside the
decoder and compose with cce_patch; its loss does not: only one forward can compute the loss. apple's
``cut_cross_entropy.transformers.cce_patch`` and Unsloth install theirs the same way.

Which loss runs, observed (tests/test_foreign_losses.py runs Liger's real forward and loss on CPU):

- foreign forward installed *after* ``patch``: it replaces ours; its loss runs, ours never does;
- ``patch`` over a foreign forward: ours wraps it and, where CCE applies (training with labels), runs it inside
  the interception; Liger's forward then computes its fused loss from ``lm_head.weight`` without calling the
  head, so no logits reach our loss and cce_patch refuses the call (``NotImplementedError``) after Liger's loss
  ran: neither trains. Elsewhere (evaluation, generation) the foreign forward runs as its library wrote it.

So the only composition that trains with CCE is the foreign library's loss off (Liger:
``fused_linear_cross_entropy=False``; the Trainer's ``use_cce`` with ``use_liger_kernel`` does it,
integrations/trainer.py, which also refuses a run where :func:`foreign_loss_forward` finds one).

Recognition is by the module that defines the forward function, looked up through bound methods,
``functools.partial`` and ``__wrapped__`` chains (accelerate and transformers wrap forwards), so nothing here
imports the libraries it recognises.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .state import class_patch, instance_patch

#: Top-level package of a forward's module -> what its loss is.
KNOWN_LOSS_LIBRARIES = {
    "liger_kernel": "Liger-Kernel's fused linear cross-entropy",
    "cut_cross_entropy": "apple's Cut Cross-Entropy",
    "unsloth": "Unsloth's fused cross-entropy",
    "unsloth_zoo": "Unsloth's fused cross-entropy",
}
_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # cce_patch/


@dataclass(frozen=True)
class ForeignLoss:
    """A forward from another library that computes the loss itself."""

    library: str  # the package, e.g. "liger_kernel"
    what: str  # e.g. "Liger-Kernel's fused linear cross-entropy"
    function: str  # e.g. "liger_kernel.transformers.model.llama.lce_forward"
    where: str  # "the instance" or "class LlamaForCausalLM"
    runs: bool  # True: it is the model's forward; False: cce_patch's forward is installed over it

    def __str__(self) -> str:
        if self.runs and self.where.startswith("torch.nn.functional"):
            return (f"{self.what} ({self.function}) replaces {self.where}: stock forwards compute their loss with "
                    "it, and a model patched by cce_patch refuses its training calls while it is there (the "
                    "deferred logits reach a function that cannot take them)")
        if self.runs:
            return f"{self.what} ({self.function}, installed on {self.where}) computes this model's loss"
        return (f"{self.what} ({self.function}, installed on {self.where}) is under cce_patch's forward: it "
                "computes its own loss without calling the head, so where CCE applies (training with labels) it "
                "runs and cce_patch then refuses the call (NotImplementedError): neither loss trains; elsewhere "
                "that forward runs as written. Install it without its loss (Liger: fused_linear_cross_entropy="
                "False) to train with cce_patch's")


def detect_foreign_loss(target: Any) -> str | None:
    """A sentence naming the other library's fused-loss forward on ``target`` (a model, a PeftModel or a model
    class) and whether it runs, or None when the model's forward is transformers' own (or ours over it).
    Also names a ``torch.nn.functional.cross_entropy`` replaced by another library (Liger's
    ``cross_entropy=True``), which stock forwards call on the logits."""
    return "; ".join(map(str, foreign_losses(target))) or None


def foreign_losses(target: Any) -> list[ForeignLoss]:
    """Every other library's loss that reaches ``target``: its fused-loss forward (:func:`foreign_loss_forward`)
    and a replaced ``torch.nn.functional.cross_entropy`` (:func:`foreign_cross_entropy`)."""
    return [f for f in (foreign_loss_forward(target), foreign_cross_entropy()) if f is not None]


def foreign_loss_forward(target: Any) -> ForeignLoss | None:
    """The foreign fused-loss forward of ``target``, looking at the instance's own forward first (it shadows
    the class's), then the class's; below cce_patch's forward, at what it replaced."""
    if isinstance(target, type):
        return _class_forward(target, runs=True)
    model = _unwrap_peft(target)
    own = model.__dict__.get("forward")
    if own is None:
        return _class_forward(type(model), runs=True)
    found, ours = _scan(own)
    if found is not None:
        return ForeignLoss(*found, where="the instance", runs=True)
    if ours is None:
        return None  # the instance has its own forward (a user's, a wrapper) that reaches no foreign loss
    record = instance_patch(model)
    replaced = record.previous if record is not None else None  # the instance's own forward that patch wrapped
    found = _scan(replaced)[0] if replaced is not None else None
    if found is not None:
        return ForeignLoss(*found, where="the instance", runs=False)
    return _class_forward(type(model), runs=False)


def foreign_cross_entropy() -> ForeignLoss | None:
    """``torch.nn.functional.cross_entropy`` when another known library has replaced it (Liger's
    ``apply_liger_kernel_to_*(cross_entropy=True)`` does, process-wide)."""
    import torch.nn.functional as F

    found = _scan(F.cross_entropy)[0]
    if found is None:
        return None
    return ForeignLoss(*found, where="torch.nn.functional.cross_entropy (process-wide)", runs=True)


def _class_forward(cls: type, runs: bool) -> ForeignLoss | None:
    for klass in cls.__mro__:
        if "forward" not in klass.__dict__:
            continue
        found, ours = _scan(klass.__dict__["forward"])
        if found is not None:
            return ForeignLoss(*found, where=f"class {klass.__name__}", runs=runs)
        if ours is None:
            return None
        # A class patch: what it replaced is remembered on the class, and is also what our forward wraps.
        record = class_patch(klass)
        replaced = record.original if record is not None else getattr(ours, "__wrapped__", None)
        found = _scan(replaced)[0] if replaced is not None else None
        return ForeignLoss(*found, where=f"class {klass.__name__}", runs=False) if found is not None else None
    return None


def _scan(fn: Any) -> tuple[tuple[str, str, str] | None, Callable | None]:
    """Walk ``fn``'s wrapping chain from the outside in: (library, what, qualified name) of the first known
    foreign function, or (None, cce_patch's forward) if ours comes first (what it wraps is what it replaced,
    not what runs), or (None, None)."""
    for layer in _layers(fn):
        if _is_ours(layer):
            return None, layer
        module = getattr(layer, "__module__", None) or ""
        library = module.split(".", 1)[0]
        if library in KNOWN_LOSS_LIBRARIES:
            name = getattr(layer, "__qualname__", getattr(layer, "__name__", repr(layer)))
            return (library, KNOWN_LOSS_LIBRARIES[library], f"{module}.{name}"), None
    return None, None


def _is_ours(fn: Any) -> bool:
    """cce_patch's patched forward: an instance's ``PatchedForward`` (a callable object of a class defined in this
    package: recognised by its class's module, so that this file need not import forward.py, whose imports reach
    back here through the interception), or a class patch's wrapper, which carries the original's name and
    module (``functools.update_wrapper``) and is recognised by where its code lives."""
    if not isinstance(fn, types.FunctionType | types.MethodType) and type(fn).__module__.startswith("cce_patch."):
        return True
    code = getattr(fn, "__code__", None)
    return code is not None and Path(code.co_filename).resolve().is_relative_to(_PACKAGE_DIR)


def _layers(fn: Any, limit: int = 16) -> list[Callable]:
    """``fn`` and everything it wraps: bound methods' functions, partials' functions, ``__wrapped__``."""
    out: list[Callable] = []
    seen: set[int] = set()
    while fn is not None and id(fn) not in seen and len(out) < limit:
        seen.add(id(fn))
        if isinstance(fn, types.MethodType):
            fn = fn.__func__
            continue
        if isinstance(fn, functools.partial):
            fn = fn.func
            continue
        out.append(fn)
        fn = getattr(fn, "__wrapped__", None)
    return out


def _unwrap_peft(model: Any) -> Any:
    """The transformers model inside a PeftModel (duck-typed: this room does not import peft)."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        try:
            base = get_base()
        except Exception:  # noqa: BLE001 - not a PeftModel after all
            return model
        return base if base is not None else model
    return model
