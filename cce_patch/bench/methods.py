"""The methods the benchmark compares: ours, plain torch, torch.compile, and the peers when importable.

Every method is a function ``loss(e, c, targets) -> scalar mean loss (fp32)`` with the same semantics (mean
cross-entropy of ``e @ c.T`` against ``targets``), so its forward time, its fwd+bwd time, its peak memory and
its gradients can be measured the same way. A method spec is a name with optional keyword options in brackets,
e.g. ``ours``, ``ours[impl=torch]``, ``ours[mode=speed]`` — the options go to
``cce_patch.linear_cross_entropy`` unchanged, so new modes of the op need no change here.

Per-token heads (TRL's fused LM head, and ours serving it): ``trl`` is TRL's ``ChunkedLogProbFunction`` (the
kernel of ``add_fused_lm_head``, TRL >= 1.15) computing the per-token log-probs, and
``trl[outputs=entropy+is_top1]`` also the entropy and the first-argmax flag, as SFTTrainer asks; ``ours[outputs=
entropy+is_top1]`` is ``cce_patch.linear_log_probs`` with the same outputs. Their loss is the mean of -log p
(the cross-entropy, so the error columns apply); the extra fields are computed in the forward and receive no
gradient, as in SFT, where they are metrics.
"""

from __future__ import annotations

import ast
import importlib
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

#: Methods tried by default, in table order. Unavailable ones (no CUDA, peer not installed) are skipped
#: with a note instead of failing the run.
#: ``ours`` is the op's default (mode="auto"); both fixed modes are listed too, so a table shows what auto chose.
DEFAULT_METHODS = ("gemm", "torch", "torch.compile", "ours", "ours[mode=memory]", "ours[mode=speed]", "cce", "cce_exact",
                   "liger", "trl")
KNOWN = ("gemm", "torch", "torch.compile", "ours", "cce", "cce_exact", "liger", "torch_lce", "trl")
#: TRL 1.15-1.16's vocabulary chunk per projection in its fused head (``trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE``).
TRL_CHUNK_SIZE = 32768


class MethodUnavailable(RuntimeError):
    """The method cannot run here (peer not installed, needs CUDA, ...): skipped, not a failure."""


@dataclass
class Method:
    """A loss function under test. ``fwd_only``: there is no backward to time (the GEMM floor)."""

    name: str
    loss: LossFn
    description: str
    fwd_only: bool = False
    options: dict = field(default_factory=dict)


_SPEC = re.compile(r"^(?P<name>[A-Za-z0-9_.]+)(?:\[(?P<opts>.*)\])?$")


def parse_spec(spec: str) -> tuple[str, dict]:
    """``"ours[mode=speed,chunk=4096]"`` -> ``("ours", {"mode": "speed", "chunk": 4096})``.

    Values are Python literals when they parse as one (numbers, True/False/None, quoted strings), ``2^k`` the
    float 2**k (``filter_eps=2^-12``, as the filter benchmark names its cells), else strings.
    """
    m = _SPEC.match(spec.strip())
    if not m:
        raise ValueError(f"bad method spec {spec!r}: expected NAME or NAME[key=value,...]")
    opts: dict = {}
    for item in filter(None, (s.strip() for s in (m.group("opts") or "").split(","))):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"bad option {item!r} in method spec {spec!r}: expected key=value")
        raw = raw.strip()
        if re.fullmatch(r"2\^-?\d+", raw):
            value = 2.0 ** int(raw[2:])
        else:
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw
        opts[key.strip()] = value
    return m.group("name"), opts


def split_specs(text: str) -> list[str]:
    """Split a comma-separated method list, keeping commas inside brackets: ``ours[a=1,b=2],torch``."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [s.strip() for s in out if s.strip()]


def dense_loss(e: torch.Tensor, c: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What users write without a fused kernel: materialize the logits, upcast, cross-entropy."""
    return F.cross_entropy((e @ c.T).float(), t)


def _gemm(e: torch.Tensor, c: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return e @ c.T


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - any metadata problem just means "unknown"
        return None


def _import(module: str, what: str):
    try:
        return importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - ImportError, or a peer broken on this torch/triton
        raise MethodUnavailable(f"{what} not importable ({type(exc).__name__}: {exc})") from None


def _need_cuda(device: torch.device, name: str) -> None:
    if device.type != "cuda":
        raise MethodUnavailable(f"{name} needs a CUDA device")


def build(spec: str, device: torch.device) -> Method:
    """Build the method named by ``spec`` for ``device``; ``MethodUnavailable`` if it cannot run here."""
    name, opts = parse_spec(spec)
    if name == "ours" and "outputs" in opts:
        return _ours_per_token(spec, opts)
    if name == "trl":
        return _trl(spec, opts)
    if name == "ours":
        from cce_patch import linear_cross_entropy

        # "auto", as users get it: Triton on CUDA, except IEEE fp32, which takes cuBLAS (ops.api.resolve_impl)
        kwargs = {"impl": "auto", **opts}
        label = "ours" if not opts else spec

        def ours(e, c, t, _kw=kwargs):
            return linear_cross_entropy(e, c, t, **_kw)

        return Method(label, ours, f"cce_patch.linear_cross_entropy({_fmt(kwargs)})", options=kwargs)
    if opts:
        raise ValueError(f"method {name!r} takes no options (got {opts})")
    if name == "torch":
        return Method(name, dense_loss, "F.cross_entropy((e @ c.T).float(), t)")
    if name == "gemm":
        return Method(name, _gemm, "one GEMM e @ c.T (the floor for one pass)", fwd_only=True)
    if name == "torch.compile":
        import torch._dynamo

        # A fresh cache per shape: static shapes (as a training loop sees them), no recompile-limit surprises.
        torch._dynamo.reset()
        compiled = torch.compile(dense_loss, dynamic=False)
        return Method(name, compiled, "torch.compile(F.cross_entropy((e @ c.T).float(), t))")
    if name == "torch_lce":
        fn = getattr(F, "linear_cross_entropy", None)
        if fn is None:
            raise MethodUnavailable(f"torch {torch.__version__} has no F.linear_cross_entropy")
        return Method(name, lambda e, c, t: fn(e, c, t), "torch.nn.functional.linear_cross_entropy(e, c, t)")
    if name in ("cce", "cce_exact"):
        return _apple(name, device)
    if name == "liger":
        _need_cuda(device, "liger")
        mod = _import("liger_kernel.transformers", "liger_kernel")
        loss_mod = mod.LigerFusedLinearCrossEntropyLoss()

        def liger(e, c, t):
            out = loss_mod(c, e, t)
            return getattr(out, "loss", out)

        return Method(
            name, liger, f"liger_kernel {_version('liger-kernel')} LigerFusedLinearCrossEntropyLoss"
        )
    raise ValueError(f"unknown method {name!r}; known: {', '.join(KNOWN)} (ours takes [key=value,...])")


def _outputs(value: object) -> tuple[str, ...]:
    """``"entropy+is_top1"`` -> ``("log_probs", "entropy", "is_top1")`` (log-probs are always computed)."""
    names = tuple(n.strip() for n in str(value).split("+") if n.strip())
    return ("log_probs", *(n for n in names if n != "log_probs"))


def _ours_per_token(spec: str, opts: dict) -> Method:
    """``linear_log_probs`` with TRL's per-token outputs; the loss is the mean of -log p."""
    from cce_patch import linear_log_probs

    opts = dict(opts)
    outputs = _outputs(opts.pop("outputs"))
    refused = sorted(set(opts) & {"mode", "reduction", "label_smoothing", "return_lse", "speed_chunk_bytes"})
    if refused:
        raise ValueError(f"{spec}: linear_log_probs takes no {refused} (per-token outputs, memory mode)")
    kwargs = {"impl": "auto", **opts}

    def ours(e, c, t, _kw=kwargs, _outputs=outputs):
        stats = linear_log_probs(e, c, t, outputs=_outputs, **_kw)
        return -stats.log_probs.sum() / stats.mask.sum().clamp_min(1)

    return Method(spec, ours, f"cce_patch.linear_log_probs(outputs={outputs}, {_fmt(kwargs)}) -> mean -log p",
                  options={"outputs": outputs, **kwargs})


def _trl(spec: str, opts: dict) -> Method:
    """TRL's fused LM head kernel, ``trl.kernels.chunked_logprob.ChunkedLogProbFunction``, as its head calls it
    (TRL's vocabulary chunk, no bias, temperature 1); the bench's targets are all counted, so no row selection."""
    opts = dict(opts)
    outputs = _outputs(opts.pop("outputs", "log_probs"))
    if opts:
        raise ValueError(f"method 'trl' takes only outputs=... (got {opts})")
    kernel = _import("trl.kernels.chunked_logprob", "trl (>= 1.15, for its fused LM head)")
    function = getattr(kernel, "ChunkedLogProbFunction", None)
    if function is None:
        raise MethodUnavailable(f"trl {_version('trl')} has no ChunkedLogProbFunction (it arrived in 1.15)")
    # trl.trainer.utils holds TRL's chunk but imports half of TRL's dependencies: read it only if it is loaded
    chunk = getattr(sys.modules.get("trl.trainer.utils"), "_CHUNKED_LOGPROB_CHUNK_SIZE", TRL_CHUNK_SIZE)

    def trl_head(e, c, t, _outputs=outputs):
        log_probs = function.apply(e, c, None, t, 1.0, chunk, None, 1.0, _outputs)[0]
        return -log_probs.mean()

    return Method(spec, trl_head, f"trl {_version('trl')} ChunkedLogProbFunction(outputs={outputs}, chunk={chunk})")


def _apple(name: str, device: torch.device) -> Method:
    """apple's ml-cross-entropy. ``cce``: its default gradient filtering. ``cce_exact``: its exact mode —
    ``impl="cce_exact"`` where the installed version has it, else (PyPI 25.1.1) ``filter_eps=None``, which
    turns its filtering off in the same kernels."""
    _need_cuda(device, name)
    mod = _import("cut_cross_entropy", "cut_cross_entropy")
    ver = _version("cut-cross-entropy")
    lce = mod.linear_cross_entropy
    if name == "cce":
        return Method(name, lambda e, c, t: lce(e, c, t, impl="cce"), f"cut_cross_entropy {ver} impl='cce'")
    impls = getattr(mod, "LinearCrossEntropyImpl", None)
    if impls is not None and hasattr(impls, "CCE_EXACT"):
        return Method(
            name, lambda e, c, t: lce(e, c, t, impl="cce_exact"), f"cut_cross_entropy {ver} impl='cce_exact'"
        )
    return Method(
        name,
        lambda e, c, t: lce(e, c, t, impl="cce", filter_eps=None),
        f"cut_cross_entropy {ver} impl='cce', filter_eps=None (no cce_exact in this version)",
    )


def _fmt(kwargs: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def default_specs(device: torch.device) -> list[str]:
    """On CUDA every method (unavailable peers are reported as skipped); on CPU the ones that run there
    quickly (torch.compile on CPU needs a C++ toolchain and a minute of compilation)."""
    if device.type == "cuda":
        return list(DEFAULT_METHODS)
    return ["torch", "ours", "ours[mode=memory]", "ours[mode=speed]"]


def peer_versions() -> dict[str, str | None]:
    """Installed versions of the peers (None when absent), for the report header."""
    return {
        "cut-cross-entropy": _version("cut-cross-entropy"),
        "liger-kernel": _version("liger-kernel"),
        "trl": _version("trl"),
    }
