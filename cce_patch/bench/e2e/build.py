"""What the end-to-end benchmark runs: a random-init model of a real architecture, and the variants of its loss.

Variants (one model instance, applied and fully undone in turn, so every variant sees the same weights):

- ``stock``: transformers as installed;
- ``ours``: ``cce_patch.patch(model, **options)`` (options from ``--patch-option`` or ``ours[key=value]``);
- ``liger``: Liger-Kernel with all its kernels, its fused linear cross-entropy included (its defaults);
- ``ours+liger``: Liger's other kernels (RMSNorm, SwiGLU/GeGLU, RoPE), its fused loss off, then our patch: the
  documented composition order.

Liger patches process-wide attributes (the family's modeling module: ``apply_rotary_pos_emb``, the RMSNorm
and MLP classes; ``torch.nn.functional.cross_entropy`` when asked) and binds forwards on the instance and its
modules. :func:`liger_kernels` snapshots all of it and restores it on exit, so a later variant (or model) runs
exactly what it would have without Liger.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ...models.architectures import architecture_config
from .. import methods as M

log = logging.getLogger("cce_patch.bench")

VARIANTS = ("stock", "ours", "liger", "ours+liger")
#: Old name of ``ours`` (the e2e JSON of earlier runs says ``patched``).
ALIASES = {"patched": "ours"}


@dataclass(frozen=True)
class Variant:
    """A variant name and the options ``ours`` / ``ours+liger`` pass to ``cce_patch.patch``."""

    name: str
    options: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        if not self.options:
            return self.name
        return self.name + "[" + ",".join(f"{k}={v}" for k, v in self.options.items()) + "]"

    @property
    def uses_ours(self) -> bool:
        return self.name in ("ours", "ours+liger")

    @property
    def uses_liger(self) -> bool:
        return self.name in ("liger", "ours+liger")


def parse_variant(spec: str, default_options: dict | None = None) -> Variant:
    """``"ours"``, ``"ours[mode=speed]"``, ``"ours+liger"``, ``"liger"``, ``"stock"`` (``"patched"`` = ours).
    Options in brackets replace ``default_options`` (the ``--patch-option`` values) for that variant."""
    name, bracket, rest = spec.strip().partition("[")
    name = ALIASES.get(name.strip(), name.strip())
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {spec!r}; choose from {', '.join(VARIANTS)} (ours takes [key=value,...])")
    options = dict(default_options or {}) if name in ("ours", "ours+liger") else {}
    if bracket:
        if name not in ("ours", "ours+liger"):
            raise ValueError(f"variant {name!r} takes no options (got {spec!r})")
        options.update(M.parse_spec("ours[" + rest)[1])
    return Variant(name, options)


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def build_model(name: str, device: torch.device, dtype: torch.dtype, seed: int = 0, attn: str = "sdpa"):
    """Random-init model on ``device`` in ``dtype`` (created there directly), gradient checkpointing,
    attention ``attn`` — falling back to ``eager`` where transformers refuses it (some versions refuse SDPA
    for Gemma 2, whose attention logit softcapping SDPA cannot apply).
    ``model.config._attn_implementation`` says which ran."""
    from transformers import AutoModelForCausalLM

    try:
        cfg = architecture_config(name)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    cfg.use_cache = False
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            try:
                torch.manual_seed(seed)
                model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
            except ValueError as exc:
                if attn == "eager":
                    raise
                log.warning("%s: attn_implementation=%r refused (%s); using 'eager'", name, attn,
                            str(exc).split(".")[0])
                torch.manual_seed(seed)
                model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    finally:
        torch.set_default_dtype(old)
    model.to(device=device, dtype=dtype)
    # transformers >= 5.2x renamed it; older versions only have the first name.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def unavailable_reason(variant: Variant, device: torch.device) -> str | None:
    """Why ``variant`` cannot run here (reported as skipped), or None."""
    if not variant.uses_liger:
        return None
    if not liger_available():
        return "liger-kernel is not installed (pip install liger-kernel)"
    if device.type != "cuda":
        return "Liger-Kernel's Triton kernels need a CUDA device"
    return None


@contextlib.contextmanager
def applied(model: torch.nn.Module, variant: Variant) -> Iterator[None]:
    """``model`` runs ``variant`` inside the block; on exit it is stock again."""
    from cce_patch import patch, unpatch

    with contextlib.ExitStack() as stack:
        if variant.uses_liger:
            stack.enter_context(liger_kernels(model, fused_loss=variant.name == "liger"))
        if variant.uses_ours:
            patch(model, **variant.options)
            stack.callback(unpatch, model)
        yield


@contextlib.contextmanager
def liger_kernels(model: torch.nn.Module, fused_loss: bool) -> Iterator[None]:
    """Liger-Kernel's kernels on ``model`` (through its per-family ``apply_liger_kernel_to_*`` with
    ``model=``), its fused linear cross-entropy on or off, its cross-entropy replacement off; everything
    restored on exit."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = model.config.model_type
    apply = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if apply is None:
        raise RuntimeError(f"Liger-Kernel has no kernels for model type {model_type!r}")
    params = inspect.signature(apply).parameters
    kwargs = {"model": model, "fused_linear_cross_entropy": fused_loss}
    if "cross_entropy" in params:
        kwargs["cross_entropy"] = False
    modules = [sys.modules[type(model).__module__], torch.nn.functional]
    saved_modules = [dict(vars(m)) for m in modules]
    saved_instances = [(m, dict(m.__dict__)) for m in model.modules()]
    try:
        apply(**kwargs)
        yield
    finally:
        for module, before in zip(modules, saved_modules, strict=True):
            _restore(module.__dict__, before, lambda key, value, m=module: setattr(m, key, value),
                     lambda key, m=module: delattr(m, key))
        for module, before in saved_instances:
            _restore(module.__dict__, before, module.__dict__.__setitem__, module.__dict__.__delitem__)


def _restore(now: dict, before: dict, set_item, del_item) -> None:
    for key in [k for k in now if k not in before]:
        del_item(key)
    for key, value in before.items():
        if now.get(key, object()) is not value:
            set_item(key, value)
