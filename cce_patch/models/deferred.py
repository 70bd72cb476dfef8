"""``DeferredLogits``: what the head would have returned, kept as ``(hidden, weight, bias)`` and never computed.

While a patched model computes its training loss, the head's final ``F.linear`` returns one of these instead
of the ``[tokens x vocab]`` logits (``intercept.py``). Stock code then runs as written: whatever it does to the
logits between the head and the loss goes through ``__torch_function__`` (or an operator / method defined
here), and is either folded exactly into the three tensors or refused:

- a scale (python number, 0-dim tensor, a per-row ``(..., 1)`` tensor, or a per-vocab-entry ``(V,)`` tensor)
  multiplies or divides the hidden states, respectively the weight rows (and the bias): ``s * (h W^T + b)``
  is ``(s h) W^T + s b``;
- the soft cap ``cap * tanh(logits / cap)`` (Gemma 2/3, also written ``torch.tanh(x / cap) * cap``) becomes
  the op's ``softcap``;
- casts (``.float()``, ``.to(dtype)``), ``.contiguous()``, ``.clone()`` change only the dtype stock's logits
  would have, which the loss is given;
- indexing, ``view``/``reshape``/``flatten``/``squeeze``/``transpose`` over token dimensions apply to the
  hidden states' rows; slicing the vocabulary dimension selects weight rows;
- ``F.cross_entropy`` (also through ``nn.CrossEntropyLoss``, transformers' ``ForCausalLMLoss``) and
  ``torch.logsumexp`` over the vocabulary are computed by ``linear_cross_entropy``, with F.cross_entropy's
  semantics (``ignore_index``, ``reduction``, ``label_smoothing``; ``mean`` is sum / non-ignored count).

Anything else (a softmax, an addition of another ``[.., V]`` tensor, a scale after the soft cap, ...) raises
``NotImplementedError`` naming the operation and the model type: a model is never trained on a different loss.
Objects are immutable (in-place operators return a new object that the caller rebinds), except the in-place
methods (``mul_``...), which update the object itself as they would a tensor.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, Protocol

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Reduction

#: Operation names (``func.__name__`` as ``__torch_function__`` sees them) grouped by what they mean here.
_MUL = {"mul", "multiply", "__mul__", "__rmul__", "mul_", "__imul__"}
_DIV = {"div", "divide", "true_divide", "__truediv__", "div_", "__itruediv__"}
_NEG = {"neg", "negative", "__neg__"}
_TANH = {"tanh", "tanh_"}
_CASTS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64}
_IDENTITY = {"contiguous", "clone", "__copy__"}
_IN_PLACE = {"mul_", "div_", "tanh_", "neg_"}


class LossSite(Protocol):
    """What deferred logits call back: the patched call that made them (``intercept.Interception``). Declared
    here, by its user, so that this module needs nothing from the one that creates its objects."""

    seen: set[str]  # the logit transforms folded, for the census's notes

    def cross_entropy(self, logits: DeferredLogits, rows: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                      reduction: str, label_smoothing: float) -> torch.Tensor: ...

    def logsumexp(self, logits: DeferredLogits) -> torch.Tensor: ...

    def refuse(self, operation: str, detail: str = "") -> NoReturn: ...


class DeferredLogits:
    """The logits ``squash(hidden @ weight.T + bias)`` cast to ``dtype``, with ``squash`` one of: none,
    ``tanh``, or the soft cap ``cap * tanh(x / cap)`` (``softcap`` set). ``hidden`` has the token dimensions
    of the logits (``(*tokens, H)``); ``weight`` is ``(V, H)``."""

    __slots__ = ("hidden", "weight", "bias", "squashed", "softcap", "dtype", "site", "scale")

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                 site: LossSite, squashed: bool = False, softcap: float | None = None, scale: float = 1.0) -> None:
        self.hidden, self.weight, self.bias, self.dtype, self.site = hidden, weight, bias, dtype, site
        self.squashed, self.softcap = squashed, softcap
        self.scale = scale  # the scalar factor folded so far (NaN: a tensor one), for the census's notes only

    # ----- tensor-like queries -------------------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.hidden.shape[:-1], self.weight.shape[0]))

    @property
    def ndim(self) -> int:
        return self.hidden.dim()

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    @property
    def is_cuda(self) -> bool:
        return self.hidden.is_cuda

    @property
    def requires_grad(self) -> bool:
        return any(t is not None and t.requires_grad for t in (self.hidden, self.weight, self.bias))

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return self.ndim

    def numel(self) -> int:
        return self.shape.numel()

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        cap = f", softcap={self.softcap}" if self.softcap is not None else (", tanh" if self.squashed else "")
        return f"DeferredLogits(shape={tuple(self.shape)}, dtype={self.dtype}{cap})"

    # ----- the protocol --------------------------------------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func: Callable, types: Any, args: Sequence = (), kwargs: dict | None = None) -> Any:
        deferred = next(a for a in (*args, *(kwargs or {}).values()) if isinstance(a, DeferredLogits))
        return deferred._apply(getattr(func, "__name__", str(func)), tuple(args), dict(kwargs or {}))

    def __getattr__(self, name: str) -> Any:  # tensor methods not defined below: routed, and refused if unknown
        if name.startswith("__") or not hasattr(torch.Tensor, name):
            raise AttributeError(name)
        return lambda *args, **kwargs: self._apply(name, (self, *args), kwargs)

    def __mul__(self, other: Any) -> DeferredLogits:
        return self._apply("__mul__", (self, other), {})

    __rmul__ = __mul__

    def __truediv__(self, other: Any) -> DeferredLogits:
        return self._apply("__truediv__", (self, other), {})

    def __neg__(self) -> DeferredLogits:
        return self._apply("__neg__", (self,), {})

    def __getitem__(self, key: Any) -> DeferredLogits:
        return self._apply("__getitem__", (self, key), {})

    def _operator(name: str) -> Callable:  # noqa: N805 - builds methods in the class body
        def method(self: DeferredLogits, *args: Any) -> Any:
            return self._apply(name, (self, *args), {})

        method.__name__ = name
        return method

    # operators with no exact counterpart: refused with the message, not Python's "unsupported operand"
    for _name in ("__add__", "__radd__", "__sub__", "__rsub__", "__rtruediv__", "__matmul__", "__rmatmul__",
                  "__pow__", "__lt__", "__le__", "__gt__", "__ge__", "__bool__", "__float__", "__int__", "__abs__"):
        locals()[_name] = _operator(_name)
    del _name, _operator

    def _refused(self, name: str, detail: str = "") -> Any:
        return self.site.refuse(name, detail)

    # ----- dispatch --------------------------------------------------------------------------------------------
    def _apply(self, name: str, args: tuple, kwargs: dict) -> Any:
        if name in _IN_PLACE:
            if args[0] is not self:
                return self._refused(name, "in-place into another tensor")
            result = self._apply(name[:-1], args, kwargs)
            self._assign(result)
            return self
        others = [a for a in args if a is not self]
        if name in _MUL and len(others) == 1 and not kwargs:
            return self._scaled(others[0], divide=False)
        if name in _DIV and len(args) == 2 and args[0] is self and not kwargs.get("rounding_mode"):
            return self._scaled(args[1], divide=True)
        if name in _NEG and len(args) == 1:
            return self._scaled(-1.0, divide=False)
        if name in _TANH and len(args) == 1:
            if self.squashed or self.softcap is not None:
                return self._refused(name, "tanh of already squashed logits")
            return self._replace(squashed=True)
        if name in _CASTS and len(args) == 1 and not kwargs:
            return self._replace(dtype=_CASTS[name])
        if name == "to":
            return self._to(args[1:], kwargs)
        if name == "type_as" and len(args) == 2 and isinstance(args[1], torch.Tensor):
            return self._to((args[1].device, args[1].dtype), {})
        if name in _IDENTITY and args == (self,):
            return self._replace()
        if name == "__getitem__":
            return self._index(args[1])
        if name in ("view", "reshape"):
            return self._reshape(args[1:], name)
        if name == "flatten":
            return self._flatten(*args[1:], **kwargs)
        if name in ("unsqueeze", "squeeze", "transpose", "swapaxes", "permute"):
            return self._token_dims(name, args[1:], kwargs)
        if name in ("size", "dim", "numel"):
            return getattr(self, name)(*args[1:], **kwargs)
        if name == "cross_entropy" and args and args[0] is self:
            return self._cross_entropy(*args[1:], **kwargs)
        if name == "logsumexp" and args and args[0] is self:
            return self._logsumexp(*args[1:], **kwargs)
        return self._refused(name)

    def _replace(self, **changes: Any) -> DeferredLogits:
        state = {k: getattr(self, k) for k in DeferredLogits.__slots__}
        state.update(changes)
        return DeferredLogits(**state)

    def _assign(self, other: DeferredLogits) -> None:
        for k in DeferredLogits.__slots__:
            setattr(self, k, getattr(other, k))

    # ----- scales and the soft cap ----------------------------------------------------------------------------
    def _product_dtype(self, factor: Any) -> torch.dtype:
        """The dtype of ``logits * factor`` by torch's promotion rules, for floating logits: a scalar (a Python
        number or a 0-dim tensor, of a category no higher than floating: complex factors never reach here) keeps
        the logits' dtype; a tensor that broadcasts promotes with it. Why not ``torch.result_type``: it returns a
        dtype from a torch call, which breaks ``torch.compile``'s graph at every scaled head (Gemma 2's soft cap:
        5 breaks per forward); ``torch.promote_types`` is folded to a constant while tracing."""
        if isinstance(factor, torch.Tensor) and factor.dim() > 0:
            return torch.promote_types(self.dtype, factor.dtype)
        return self.dtype

    def _scaled(self, factor: Any, divide: bool) -> DeferredLogits:
        op = torch.div if divide else torch.mul
        shape = self.shape
        if isinstance(factor, DeferredLogits):
            return self._refused("mul" if not divide else "div", "a product of two logit tensors")
        if isinstance(factor, bool | complex) or not isinstance(factor, numbers.Number | torch.Tensor):
            return self._refused("mul" if not divide else "div", f"by {type(factor).__name__}")
        if isinstance(factor, torch.Tensor):
            if not factor.is_floating_point() and factor.dtype not in (torch.int64, torch.int32):
                return self._refused("mul", f"by a {factor.dtype} tensor")
            try:
                if torch.broadcast_shapes(factor.shape, shape) != shape:
                    return self._refused("mul", f"by a tensor of shape {tuple(factor.shape)} that broadcasts the logits")
            except RuntimeError:
                return self._refused("mul", f"by a tensor of shape {tuple(factor.shape)}")
        dtype = self._product_dtype(factor)
        scalar = not isinstance(factor, torch.Tensor) or factor.dim() == 0
        if self.softcap is not None:
            return self._refused("mul" if not divide else "div", "a scale applied after the soft cap")
        if self.squashed:  # cap * tanh(z) == cap * tanh((cap z) / cap): the soft cap, with z scaled by cap
            if not scalar:
                return self._refused("mul", "a non-scalar soft cap")
            cap = float(factor)
            if isinstance(factor, torch.Tensor) and factor.requires_grad:
                return self._refused("mul", "a learned soft cap")
            cap = 1.0 / cap if divide else cap
            if cap == 0.0 or cap != cap or abs(cap) == float("inf"):
                return self._refused("mul", f"a soft cap of {cap}")
            self.site.seen.add("soft cap")
            scale = 1.0 if abs(self.scale * cap - 1.0) < 1e-6 else self.scale  # x / cap belongs to the cap
            return self._replace(hidden=_fold(self.hidden, cap, torch.mul), bias=_fold(self.bias, cap, torch.mul),
                                 squashed=False, softcap=abs(cap), dtype=dtype, scale=scale)
        if scalar:  # a scalar scales the hidden states (fewer elements than the weight)
            if isinstance(factor, torch.Tensor):
                factor = factor.to(self.hidden.device)
                scale = float("nan")
            else:
                scale = self.scale / factor if divide else self.scale * factor
            return self._replace(hidden=_fold(self.hidden, factor, op), bias=_fold(self.bias, factor, op), dtype=dtype,
                                 scale=scale)
        leading = factor.shape[:-1] if factor.dim() >= 1 else ()
        if factor.shape[-1] == 1:  # one factor per token row: (..., 1)
            if self.bias is not None:
                return self._refused("mul", "a per-row scale of logits with a head bias")
            self.site.seen.add("per-token scale")
            return self._replace(hidden=_fold(self.hidden, factor.to(self.hidden.device), op), dtype=dtype)
        if all(s == 1 for s in leading):  # one factor per vocabulary entry: (V,) or (1, .., V)
            column = factor.reshape(-1).to(self.weight.device)
            self.site.seen.add("per-vocab scale")
            return self._replace(weight=_fold(self.weight, column[:, None], op), bias=_fold(self.bias, column, op),
                                 dtype=dtype)
        return self._refused("mul", f"by a tensor of shape {tuple(factor.shape)} (elementwise over tokens and vocab)")

    # ----- dtype / device --------------------------------------------------------------------------------------
    def _to(self, args: tuple, kwargs: dict) -> DeferredLogits:
        dtype, device = kwargs.get("dtype"), kwargs.get("device")
        for a in args:
            if isinstance(a, torch.dtype):
                dtype = a
            elif isinstance(a, str | torch.device | int):
                device = a
            elif isinstance(a, torch.Tensor):
                dtype, device = a.dtype, a.device
            else:
                return self._refused("to", f"with argument {a!r}")
        if device is not None and torch.device(device) != self.device and not (
            torch.device(device).type == self.device.type and torch.device(device).index is None
        ):
            return self._refused("to", f"a move to another device ({device})")
        return self._replace(dtype=dtype) if dtype is not None else self._replace()

    # ----- token and vocabulary dimensions -----------------------------------------------------------------------
    def _index(self, key: Any) -> DeferredLogits:
        key = key if isinstance(key, tuple) else (key,)
        ndim = self.ndim

        def width(k: Any) -> int:
            return k.dim() if isinstance(k, torch.Tensor) and k.dtype == torch.bool else 1

        if any(k is None for k in key):
            return self._refused("__getitem__", "indexing that inserts dimensions")
        used = sum(width(k) for k in key if k is not Ellipsis)
        if used > ndim:
            return self._refused("__getitem__", "too many indices")
        if Ellipsis in key:
            i = key.index(Ellipsis)
            key = key[:i] + (slice(None),) * (ndim - used) + key[i + 1:]
        else:
            key = key + (slice(None),) * (ndim - used)
        *tokens, vocab = key
        if width(vocab) != 1 or (tokens and sum(width(k) for k in tokens) != ndim - 1):
            return self._refused("__getitem__", "a mask over the vocabulary dimension")
        hidden = self.hidden[(*tokens, slice(None))] if any(_not_full(k) for k in tokens) else self.hidden
        weight, bias = self.weight, self.bias
        if isinstance(vocab, slice):
            if vocab != slice(None):
                self.site.seen.add("vocab slice")
                weight, bias = weight[vocab], bias[vocab] if bias is not None else None
        elif isinstance(vocab, torch.Tensor) and vocab.dim() == 1 and not vocab.is_floating_point() and not any(
            isinstance(k, torch.Tensor | Sequence) for k in tokens
        ):
            weight, bias = weight[vocab], bias[vocab] if bias is not None else None
        else:
            return self._refused("__getitem__", f"index {vocab!r} over the vocabulary dimension")
        return self._replace(hidden=hidden, weight=weight, bias=bias)

    def _reshape(self, shape: tuple, name: str) -> DeferredLogits:
        if len(shape) == 1 and isinstance(shape[0], Sequence | torch.Size):
            shape = tuple(shape[0])
        if not shape or shape[-1] != self.weight.shape[0]:
            return self._refused(name, f"to shape {tuple(shape)}, which does not keep the vocabulary ({self.weight.shape[0]}) "
                                       "as the last dimension")
        return self._replace(hidden=self.hidden.reshape(*shape[:-1], self.hidden.shape[-1]))

    def _flatten(self, start_dim: int = 0, end_dim: int = -1) -> DeferredLogits:
        ndim = self.ndim
        start, end = start_dim % ndim, end_dim % ndim
        if end == ndim - 1 and start < end:
            return self._refused("flatten", "flattening the vocabulary dimension into the tokens")
        return self._replace(hidden=self.hidden.flatten(start, end)) if start < end else self._replace()

    def _token_dims(self, name: str, args: tuple, kwargs: dict) -> DeferredLogits:
        ndim = self.ndim
        if name == "squeeze" and not args and not kwargs:
            kept = [s for s in self.hidden.shape[:-1] if s != 1]
            return self._replace(hidden=self.hidden.reshape(*kept, self.hidden.shape[-1]))
        dims = list(args[0]) if name == "permute" and len(args) == 1 and isinstance(args[0], Sequence) else list(args)
        dims += list(kwargs.values())
        if not all(isinstance(d, int) for d in dims):
            return self._refused(name, f"with arguments {dims!r}")
        if name == "unsqueeze":
            at = dims[0] % (ndim + 1)
            return self._replace(hidden=self.hidden.unsqueeze(at)) if at < ndim else self._refused(name, "after the vocabulary")
        if name == "permute":
            order = [d % ndim for d in dims]
            return self._replace(hidden=self.hidden.permute(*order)) if order[-1] == ndim - 1 else self._refused(
                name, "moving the vocabulary dimension")
        normal = [d % ndim for d in dims]
        if ndim - 1 in normal:
            return self._refused(name, "over the vocabulary dimension")
        return self._replace(hidden=getattr(self.hidden, name)(*normal))

    # ----- the losses -------------------------------------------------------------------------------------------
    def _cross_entropy(self, target: torch.Tensor, weight: torch.Tensor | None = None, size_average: Any = None,
                       ignore_index: int = -100, reduce: Any = None, reduction: str = "mean",
                       label_smoothing: float = 0.0) -> torch.Tensor:
        if weight is not None:
            return self._refused("cross_entropy", "with class weights")
        if size_average is not None or reduce is not None:
            reduction = _Reduction.legacy_get_string(size_average, reduce)
        if isinstance(target, DeferredLogits) or not isinstance(target, torch.Tensor) or target.is_floating_point():
            return self._refused("cross_entropy", "with probability targets")
        if self.ndim == 1 and target.dim() == 0:
            rows, targets = self.hidden.unsqueeze(0), target.reshape(1)
        elif self.ndim == 2 and target.dim() == 1:
            rows, targets = self.hidden, target
        else:
            return self._refused("cross_entropy", f"on logits of shape {tuple(self.shape)} (class dimension not last)")
        if reduction not in ("mean", "sum", "none"):
            return self._refused("cross_entropy", f"with reduction={reduction!r}")
        self._note_scale()
        # the op's reductions are F.cross_entropy's (mean: over non-ignored targets), except that a call whose
        # targets are all ignored has mean 0 with zero gradients where F.cross_entropy gives NaN
        loss = self.site.cross_entropy(self, rows, targets.to(rows.device), int(ignore_index), reduction,
                                       float(label_smoothing))
        if reduction == "none" and self.ndim == 1:
            loss = loss.reshape(())
        return loss.to(self.dtype)

    def _logsumexp(self, dim: Any, keepdim: bool = False) -> torch.Tensor:
        dims = list(dim) if isinstance(dim, Sequence) else [dim]
        if [d % self.ndim for d in dims] != [self.ndim - 1]:
            return self._refused("logsumexp", "over token dimensions")
        self.site.seen.add("logsumexp")
        self._note_scale()
        lse = self.site.logsumexp(self)
        return (lse.unsqueeze(-1) if keepdim else lse).to(self.dtype)

    def _note_scale(self) -> None:
        if self.scale != 1.0:  # also NaN
            self.site.seen.add("logit scale")

    def materialize(self) -> torch.Tensor:
        """The real logits (``return_logits=True``): the memory CCE otherwise saves."""
        with torch.autocast(self.hidden.device.type, enabled=False):
            logits = F.linear(self.hidden, self.weight, self.bias)
            if self.squashed:
                logits = torch.tanh(logits)
            elif self.softcap is not None:
                logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits.to(self.dtype)


def _fold(t: torch.Tensor | None, factor: Any, op: Callable) -> torch.Tensor | None:
    """``op(t, factor)`` in ``t``'s dtype (the op takes hidden and weight of one dtype)."""
    return None if t is None else op(t, factor).to(t.dtype)


def _not_full(k: Any) -> bool:
    return not (isinstance(k, slice) and k == slice(None))
