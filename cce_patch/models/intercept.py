"""One CCE call of a patched model: the stock forward runs as written, with the head's final ``F.linear`` deferred.

While :class:`Interception` is entered, the head (``get_output_embeddings()`` or a registry row's head)
answers with a :class:`~cce_patch.models.deferred.DeferredLogits` instead of computing the logits, in one of
two ways. A plain projection (``nn.Linear``, or PEFT's ``modules_to_save`` copy of one) is shadowed at its
attribute by a stand-in that defers ``F.linear(hidden, weight, bias)`` without running the module, so no hook
that gathers or reshards a sharded weight around the head runs (as when the loss read ``lm_head.weight``
itself). A head with its own forward (an ``nn.Linear`` subclass with a learned per-vocabulary scale, a
prediction transform before the projection, PEFT's trainable tokens) runs that forward under a
``TorchFunctionMode`` that answers the ``F.linear`` producing the vocabulary; only the head's forward is under
the mode (a pre-hook enters it, an always-called hook leaves it), so the decoder runs at full speed.

Everything the stock forward does with the logits afterwards goes through the deferred object: its loss
(``self.loss_function``, ``CrossEntropyLoss``) reaches :meth:`Interception.cross_entropy`, which calls
``linear_cross_entropy``; MoE auxiliary losses, multimodal inputs and output classes run as the model's
authors wrote them.

After the forward, :meth:`Interception.finish` replaces every deferred object left in the output by None (or by
the real logits with ``return_logits=True``), and refuses a call whose loss did not come through CCE.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, NoReturn

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from transformers.utils import ModelOutput

from ..config import CCEConfig
from ..ops import linear_cross_entropy
from .deferred import DeferredLogits
from .foreign_losses import foreign_loss_forward
from .heads import effective_head
from .sharding import gather_for_loss

_LINEAR = {F.linear, torch._C._nn.linear}
_OBSERVED: contextvars.ContextVar[list[Interception] | None] = contextvars.ContextVar("cce_observed", default=None)


@contextlib.contextmanager
def observe() -> Iterator[list[Interception]]:
    """Collect the interceptions of the patched calls made inside the block (tests and the census read what
    each call did: ``captured``, ``losses``, ``seen``)."""
    calls: list[Interception] = []
    token = _OBSERVED.set(calls)
    try:
        yield calls
    finally:
        _OBSERVED.reset(token)


class _DeferHeadLinear(TorchFunctionMode):
    """Inside the head's forward: the ``F.linear`` whose weight has the head's output rows is deferred."""

    def __init__(self, site: Interception) -> None:
        super().__init__()
        self.site = site

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LINEAR:
            x = args[0] if len(args) > 0 else kwargs.get("input")
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor) and weight.dim() == 2
                    and weight.shape[0] == self.site.vocab):
                deferred = self.site.capture(x, weight, bias)
                if deferred is not None:
                    return deferred
        return func(*args, **kwargs)


def _plain_projection(head: nn.Module) -> nn.Linear | None:
    """The Linear a head amounts to when calling it is exactly ``F.linear(x, weight, bias)``: a plain Linear, or
    PEFT's ``modules_to_save`` copy of one. None for heads with their own forward (they run, intercepted)."""
    try:
        linear = effective_head(head)
    except NotImplementedError:
        return None
    is_wrapper = linear is not head and not (hasattr(head, "modules_to_save") and hasattr(head, "original_module"))
    if is_wrapper or type(linear).forward is not nn.Linear.forward:
        return None
    return linear


def _owner_of(model: nn.Module, head: nn.Module) -> tuple[nn.Module, str] | None:
    """The (parent module, attribute name) under which the model holds its head (usually a direct child: the walk
    stops there)."""
    for parent in model.modules():
        for name, child in parent._modules.items():
            if child is head:
                return parent, name
    return None


class _DeferredProjection:
    """Stands in for a plain projection head at its attribute for one CCE call (it shadows the submodule in the
    parent's instance ``__dict__``): ``self.lm_head(hidden)`` returns deferred logits without running the
    head module. Nothing that gathers a sharded weight around the head's own forward (FSDP2 groups, tensor-
    parallel hooks) runs either: exactly as if the stock forward read ``lm_head.weight`` itself, except that an
    FSDP2 group of the head's own is unsharded here (``sharding.py`` says what each sharded layout needs).
    Attributes read through the stand-in (``.weight``, ``.out_features``) are the head's."""

    def __init__(self, site: Interception, head: nn.Module) -> None:
        self._site, self._head = site, head

    def __call__(self, hidden: Any, *args: Any, **kwargs: Any) -> Any:
        linear = _plain_projection(self._head) if not args and not kwargs and torch.is_tensor(hidden) else None
        if linear is not None:
            gather_for_loss(self._site.model, linear)  # an FSDP2 shard that no running forward gathered
            weight = linear.weight
            x = hidden if hidden.device == weight.device else hidden.to(weight.device)  # device_map: as its hook would
            deferred = self._site.capture(x, weight, linear.bias)
            if deferred is not None:
                return deferred
        return self._head(hidden, *args, **kwargs)

    @property
    def cce_shadowed_head(self) -> nn.Module:  # heads.shadowed() looks through the stand-in with it
        return self._head

    def __getattr__(self, name: str) -> Any:
        return getattr(self._head, name)


class Interception:
    """The state of one patched call: where the head is, what the call may do, what it did."""

    def __init__(self, model: nn.Module, head: nn.Module, vocab: int, config: CCEConfig) -> None:
        self.model, self.head, self.vocab, self.config = model, head, vocab, config
        self.captured = 0  # head outputs deferred
        self.losses = 0  # cross-entropies computed by linear_cross_entropy
        self.seen: set[str] = set()  # the logit transforms folded (for the census's notes)
        self._modes: list[_DeferHeadLinear] = []
        self._handles: list[Any] = []
        self._shadowed: tuple[nn.Module, str] | None = None

    # ----- scope -----------------------------------------------------------------------------------------------
    def __enter__(self) -> Interception:
        observed = _OBSERVED.get()
        if observed is not None:
            observed.append(self)
        owner = _owner_of(self.model, self.head) if _plain_projection(self.head) is not None else None
        if owner is not None and owner[1] not in owner[0].__dict__:
            owner[0].__dict__[owner[1]] = _DeferredProjection(self, self.head)
            self._shadowed = owner
        # a head with its own forward (or reached by another name) runs, with its final F.linear deferred
        self._handles = [
            self.head.register_forward_pre_hook(self._enter_head),
            self.head.register_forward_hook(self._leave_head, always_call=True),
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._shadowed is not None:
            parent, name = self._shadowed
            parent.__dict__.pop(name, None)
            self._shadowed = None
        for handle in self._handles:
            handle.remove()
        while self._modes:  # only if a hook could not run (never expected): leave no mode behind
            self._modes.pop().__exit__(None, None, None)

    def _enter_head(self, module: nn.Module, args: Any) -> None:
        mode = _DeferHeadLinear(self)
        mode.__enter__()
        self._modes.append(mode)

    def _leave_head(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._modes:
            self._modes.pop().__exit__(None, None, None)

    # ----- what the deferred logits call back ----------------------------------------------------------------
    def capture(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> DeferredLogits | None:
        """Defer ``F.linear(x, weight, bias)``, with the operands autocast would give it (None: let F.linear
        run, e.g. to raise its own dtype error)."""
        device = x.device.type
        if torch.is_autocast_enabled(device) and x.is_floating_point():
            dtype = torch.get_autocast_dtype(device)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        if x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype) or x.dim() == 0:
            return None
        self.captured += 1
        return DeferredLogits(x, weight, bias, x.dtype, self)

    def _op_options(self, logits: DeferredLogits, reduction: str, label_smoothing: float) -> dict[str, Any]:
        softcap = logits.softcap if logits.softcap is not None else (1.0 if logits.squashed else None)
        own = self.config.label_smoothing
        if label_smoothing and own and label_smoothing != own:
            self.refuse("cross_entropy", f"label_smoothing={label_smoothing} where CCEConfig has {own}")
        options = self.config.op_options(logits.hidden.dtype, softcap, reduction)
        if label_smoothing:
            options["label_smoothing"] = label_smoothing
        return dict(options, softcap=softcap, bias=logits.bias)

    def cross_entropy(self, logits: DeferredLogits, rows: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                      reduction: str, label_smoothing: float) -> torch.Tensor:
        """``F.cross_entropy(logits, targets, reduction=reduction)`` through the op."""
        options = self._op_options(logits, reduction, label_smoothing)
        with torch.autocast(rows.device.type, enabled=False):  # the operands are already what autocast gave F.linear
            loss = linear_cross_entropy(rows, logits.weight, targets, ignore_index=ignore_index, reduction=reduction,
                                        **options)
        self.losses += 1
        return loss

    def logsumexp(self, logits: DeferredLogits) -> torch.Tensor:
        """``torch.logsumexp(logits, dim=-1)`` through the op (e.g. a z-loss)."""
        rows = logits.hidden.reshape(-1, logits.hidden.shape[-1])
        options = self._op_options(logits, "none", 0.0)
        options.update(mode="memory", label_smoothing=0.0)
        options.pop("speed_chunk_bytes", None)
        zeros = torch.zeros(rows.shape[0], dtype=torch.long, device=rows.device)  # any valid target: lse of all rows
        with torch.autocast(rows.device.type, enabled=False):
            _, lse = linear_cross_entropy(rows, logits.weight, zeros, reduction="none", return_lse=True, **options)
        return lse.reshape(logits.hidden.shape[:-1])

    def refuse(self, operation: str, detail: str = "") -> NoReturn:
        raise NotImplementedError(
            f"cce_patch cannot train model type {self.model_type!r} ({type(self.model).__name__}) exactly: its "
            f"forward applies `{operation}` to the logits{': ' + detail if detail else ''}. CCE never builds the "
            "logits, so it can only reproduce scales, soft caps, casts, token/vocabulary slicing and the "
            "cross-entropy itself. Train this model without CCE (cce_patch.unpatch(model), or use_cce=False)."
        )

    @property
    def model_type(self) -> str:
        return getattr(getattr(self.model, "config", None), "model_type", None) or type(self.model).__name__

    # ----- after the forward -------------------------------------------------------------------------------------
    def finish(self, output: Any) -> Any:
        """The stock output with deferred logits replaced; refuses a loss that did not come through CCE."""
        if self.captured == 0:
            foreign = foreign_loss_forward(self.model)
            if foreign is not None:  # the usual reason: another library's forward computed its own loss
                raise NotImplementedError(
                    f"cce_patch cannot train this {type(self.model).__name__} with CCE: {foreign.what} "
                    f"({foreign.function}, installed on {foreign.where}) runs under cce_patch's forward and "
                    "computed its own loss from lm_head.weight without calling the head, so no logits reached "
                    "CCE's loss. Install it without its loss (Liger: fused_linear_cross_entropy=False, as the "
                    "Trainer's use_cce with use_liger_kernel does), or train without cce_patch."
                )
            raise NotImplementedError(
                f"cce_patch cannot train model type {self.model_type!r} ({type(self.model).__name__}) with CCE: its "
                f"head ({type(self.head).__name__}) did not produce the logits with one F.linear over the vocabulary "
                f"({self.vocab} rows) during the forward, so the loss was computed from real logits. Train it without "
                "CCE, or add a registry row naming the head (cce_patch/models/registry.py)."
            )
        if self.losses == 0:
            raise NotImplementedError(
                f"cce_patch cannot train model type {self.model_type!r} ({type(self.model).__name__}) with CCE: labels "
                "were given but its forward computed no cross-entropy from the head's logits."
            )
        return _replace_deferred(output, self.config.return_logits)


def _replace_deferred(value: Any, materialize: bool) -> Any:
    if isinstance(value, DeferredLogits):
        return value.materialize() if materialize else None
    if isinstance(value, ModelOutput):
        for key, item in list(value.items()):
            new = _replace_deferred(item, materialize)
            if new is item:
                continue
            if new is None:  # ModelOutput keeps no None entries (its to_tuple() skips them); stock never sets one
                OrderedDict.__delitem__(value, key)
                object.__setattr__(value, key, None)
            else:
                value[key] = new
        return value
    if type(value) is tuple:
        return tuple(_replace_deferred(v, materialize) for v in value)
    if type(value) is list:
        return [_replace_deferred(v, materialize) for v in value]
    if type(value) is dict:
        return {k: _replace_deferred(v, materialize) for k, v in value.items()}
    return value
