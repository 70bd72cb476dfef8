"""Is an unregistered ``*ForCausalLM`` forward "standard"? Read its source (AST) instead of guessing.

A model type without a registry row is patched generically only when its own forward provably does nothing
to the logits that the generic forward would drop. Attribute checks alone are not enough: ``BartForCausalLM``
has ``.model`` and ``.lm_head`` but scores unshifted labels, Mixtral adds a router auxiliary loss, Bamba a
z-loss, Inkling slices the vocabulary, Gemma 3n reads its soft cap from a sub-config. So the forward must be,
statement by statement, the Llama shape::

    outputs = self.<base>(...)                      # the decoder
    hidden_states = outputs.last_hidden_state       # or outputs[0]
    [slice_indices = ... / hidden_states = slice_logits_to_keep(...)]
    logits = self.<head>(hidden_states[...])
    [if self.config.final_logit_softcapping is not None: <logits rewritten with the cap>]
    loss = None
    if labels is not None:
        loss = self.loss_function(logits=logits, labels=labels, vocab_size=..., **kwargs)
    return <output class>(...)

Anything else raises ``NotImplementedError`` naming the model type and the statement that is not understood,
so the user learns to add a registry row (or that the family needs a documented hook) instead of silently
training a different loss.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from collections.abc import Callable
from dataclasses import dataclass

#: Keywords the generic forward passes on to the loss in the same sense as ``self.loss_function``.
_LOSS_KEYWORDS = {"logits", "labels", "vocab_size"}
_SOFTCAP_ATTR = "final_logit_softcapping"
#: Arguments the generic forward keeps for itself; a decoder that needs them is not standard.
_NOT_FOR_BASE = {"labels", "logits_to_keep"}


@dataclass(frozen=True)
class ForwardShape:
    """What the source of a standard forward says: where the decoder and head are, and the soft cap."""

    base_attr: str
    head_attr: str
    softcap_attr: str | None


class NonStandardForward(Exception):
    """The forward does something the generic forward would not reproduce (message: the statement)."""


def _self_attr_call(node: ast.AST) -> str | None:
    """``self.<name>(...)`` -> name."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        owner = node.func.value
        if isinstance(owner, ast.Name) and owner.id == "self":
            return node.func.attr
    return None


def _is_softcap_test(node: ast.AST) -> bool:
    """``self.config.final_logit_softcapping is not None``."""
    return (
        isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], ast.IsNot)
        and ast.unparse(node.left) == f"self.config.{_SOFTCAP_ATTR}"
        and isinstance(node.comparators[0], ast.Constant) and node.comparators[0].value is None
    )


def _check_loss_call(node: ast.AST) -> None:
    call = node.value if isinstance(node, ast.Assign) else None
    if not (isinstance(call, ast.Call) and _self_attr_call(call) == "loss_function"):
        raise NonStandardForward(ast.unparse(node))
    extra = [k.arg for k in call.keywords if k.arg is not None and k.arg not in _LOSS_KEYWORDS]
    if extra or len(call.args) > 3:
        raise NonStandardForward(f"loss_function called with extra arguments: {ast.unparse(call)}")


def _analyse(source: str) -> ForwardShape:
    tree = ast.parse(textwrap.dedent(source))
    func = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef))
    body = [s for s in func.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    base_attr = head_attr = softcap_attr = None
    outputs_name = logits_name = None
    for stmt in body:
        text = ast.unparse(stmt)
        if isinstance(stmt, ast.Return):
            break
        target = stmt.targets[0] if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 else None
        if isinstance(stmt, ast.AnnAssign):
            target = stmt.target
        value = stmt.value if isinstance(stmt, ast.Assign | ast.AnnAssign) else None
        if head_attr is None:  # before the head: decoder call, hidden states, logits_to_keep slicing only
            called = _self_attr_call(value) if value is not None else None
            if base_attr is None and called is not None and isinstance(target, ast.Name):
                forwarded = all(
                    k.arg is None or (isinstance(k.value, ast.Name) and k.value.id == k.arg and k.arg not in _NOT_FOR_BASE)
                    for k in value.keywords
                )
                positional_ok = len(value.args) == 0 or (  # GPT-2 style: input_ids first, by position
                    len(value.args) == 1 and isinstance(value.args[0], ast.Name) and value.args[0].id == "input_ids"
                )
                if not (positional_ok and forwarded):  # the generic forward passes the caller's arguments by name
                    raise NonStandardForward(text)
                base_attr, outputs_name = called, target.id
            elif base_attr is not None and called is not None and isinstance(target, ast.Name):
                args = value.args
                plain = len(args) == 1 and not value.keywords and (
                    isinstance(args[0], ast.Name) or (isinstance(args[0], ast.Subscript) and isinstance(args[0].value, ast.Name))
                )
                if not plain:  # e.g. the hidden states rescaled on the way into the head
                    raise NonStandardForward(text)
                head_attr, logits_name = called, target.id
            elif value is not None and isinstance(target, ast.Name) and (
                text.endswith(f"= {outputs_name}.last_hidden_state")
                or text.endswith(f"= {outputs_name}[0]")
                or "slice_logits_to_keep(" in text
                or (target.id == "slice_indices" and "logits_to_keep" in text and "self" not in text)
            ):
                pass
            else:
                raise NonStandardForward(text)
            continue
        # after the head: optional standard soft cap, then the loss, nothing else
        if isinstance(stmt, ast.If) and _is_softcap_test(stmt.test) and not stmt.orelse:
            if not all(isinstance(s, ast.Assign) and ast.unparse(s.targets[0]) == logits_name for s in stmt.body):
                raise NonStandardForward(text)
            softcap_attr = _SOFTCAP_ATTR
        elif text == "loss = None":
            pass
        elif isinstance(stmt, ast.If) and ast.unparse(stmt.test) == "labels is not None" and not stmt.orelse:
            for inner in stmt.body:
                _check_loss_call(inner)
        else:
            raise NonStandardForward(text)
    if base_attr is None or head_attr is None:
        raise NonStandardForward("no `outputs = self.<decoder>(...)` followed by `logits = self.<head>(...)`")
    return ForwardShape(base_attr, head_attr, softcap_attr)


@functools.lru_cache(maxsize=256)
def forward_shape(forward: Callable) -> ForwardShape:
    """The ForwardShape of a class's (unpatched) forward, or NonStandardForward saying why it is not one."""
    try:
        source = inspect.getsource(forward)  # follows functools.wraps decorators to the real body
    except (OSError, TypeError) as exc:
        raise NonStandardForward(f"its source is not available ({exc})") from exc
    return _analyse(source)
