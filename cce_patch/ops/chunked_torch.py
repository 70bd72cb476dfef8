"""The chunked PyTorch backend: the CPU path, IEEE fp32 on CUDA, and a second implementation of the math.

It follows ``spec.LossSpec`` exactly, in fp32, processing a chunk of rows at a time so that at most
``chunk_rows x V`` logits exist at once (never the full ``N x V`` matrix). The backward pass recomputes each
chunk's logits from ``e``, ``c`` and the saved log-sum-exp, as the fused kernels do; speed mode
(``forward_with_grads``) forms each chunk's gradients while its logits exist. The per-token statistics
(``stats.py``) are ``stats_forward``, and ``backward`` with the entropy's coefficient and the logit factor.

With a gradient filter (``filtering.py``, the op's ``filter_eps``) the backward and speed mode take chunks of
whole row blocks (``filtering.block_rows``), decide per chunk which (row block, vocabulary tile) pairs to skip
from the chunk's own probabilities, and zero those probabilities before forming the logit gradient: the same
rule and bound as a block-sparse kernel, computed densely (nothing is saved on this path but the rule is
exercised on every device).
"""

from __future__ import annotations

import torch

from .filtering import GradFilter, block_rows, filter_probs_
from .spec import LossSpec, loss_weight, row_targets, valid_rows
from .stats import StatsSpec

#: fp32 logits per chunk: 64 MiB keeps the CPU path cache-friendly and bounded at any vocabulary size.
DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024
#: On a CUDA device the chunks are larger: every chunk of rows reads and writes the whole fp32 dC accumulator
#: (V x D x 8 bytes), which with 64 MiB chunks (32 rows at V=256000, D=2304: 256 passes of 4.7 GB at N=8192)
#: would cost more than the GEMMs. 1 GiB gives 524-row chunks there: 16 passes, and GEMMs large enough for
#: cuBLAS.
CUDA_CHUNK_BYTES = 1024**3


def default_chunk_bytes(device: torch.device) -> int:
    """The chunk budget of the torch path on ``device``: large on CUDA (cuBLAS GEMMs, few dC passes)."""
    return CUDA_CHUNK_BYTES if device.type == "cuda" else DEFAULT_CHUNK_BYTES


def chunk_rows_for(vocab: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk so that one chunk of fp32 logits (plus its softmax) fits ``chunk_bytes``."""
    return max(1, chunk_bytes // (vocab * 4 * 2))


class _Chunk:
    """Logits of one chunk of rows in fp32, with everything the forward and backward need from them.
    ``logit_scale`` (the statistics' alpha) multiplies ``e . c + b`` before the soft cap."""

    def __init__(self, e2d, c32, b32, targets_flat, spec: LossSpec, start: int, stop: int, logit_scale: float = 1.0):
        e = e2d[start:stop].float()
        s = e @ c32.T
        if b32 is not None:
            s = s + b32
        if logit_scale != 1.0:
            s = s * logit_scale
        if spec.softcap is not None:
            s = spec.softcap * torch.tanh(s / spec.softcap)
        self.e = e
        self.z = s
        t = row_targets(targets_flat, start, stop, spec.shift_period)
        self.valid = (t != spec.ignore_index) & (t >= 0)
        self.t = torch.where(self.valid, t, torch.zeros_like(t))


def _chunk_loss(ch: _Chunk, spec: LossSpec, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, lse) of one chunk's rows, 0 on ignored rows."""
    a = spec.label_smoothing
    lse = torch.logsumexp(ch.z, dim=-1)
    row = lse - (1.0 - a) * ch.z.gather(1, ch.t[:, None]).squeeze(1)
    if a:
        row = row - (a / vocab) * ch.z.sum(-1)
    return torch.where(ch.valid, row, 0.0), torch.where(ch.valid, lse, 0.0)


def _chunk_logit_grad(ch: _Chunk, spec: LossSpec, vocab: int, lse: torch.Tensor, g: torch.Tensor,
                      h: torch.Tensor | None, r: torch.Tensor | None = None, logit_scale: float = 1.0,
                      grad_filter: GradFilter | None = None) -> torch.Tensor:
    """dS of one chunk (spec.py's formula) for upstream gradients g on the loss and h on the LSE, plus
    (stats.py) r_i p_ij log p_ij and the factor alpha = ``logit_scale``. With ``grad_filter`` (the chunk is whole
    row blocks) the probabilities of the skipped tiles are dropped first; target and smoothing terms stay."""
    a = spec.label_smoothing
    g = torch.where(ch.valid, g.float(), 0.0)
    p = torch.exp(ch.z - lse[:, None]).masked_fill_(~ch.valid[:, None], 0.0)  # ignored rows: lse = 0, z may be big
    if grad_filter is not None:
        filter_probs_(p, ch.t, ch.valid, grad_filter)
    dz = g[:, None] * (p - a / vocab)
    dz.scatter_add_(1, ch.t[:, None], -(1.0 - a) * g[:, None])
    if h is not None:
        dz = dz + torch.where(ch.valid, h.float(), 0.0)[:, None] * p
    if r is not None:  # ignored rows: p is 0 there, and so is the term
        dz = dz + torch.where(ch.valid, r.float(), 0.0)[:, None] * p * (ch.z - lse[:, None])
    if spec.softcap is not None:
        dz = dz * (1.0 - (ch.z / spec.softcap) ** 2)
    if logit_scale != 1.0:
        dz = dz * logit_scale
    return dz


class _GradSink:
    """Where the chunks' logit gradients go: dE rows written, dC and dbias accumulated in fp32."""

    def __init__(self, e2d: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None, needs: tuple[bool, bool, bool]):
        need_de, need_dc, need_db = needs
        self.e_dtype, self.c_dtype = e2d.dtype, c.dtype
        self.b_dtype = bias.dtype if bias is not None else None
        self.de = torch.empty_like(e2d) if need_de else None
        self.dc = torch.zeros(c.shape, dtype=torch.float32, device=c.device) if need_dc else None
        self.db = torch.zeros(c.shape[0], dtype=torch.float32, device=c.device) if need_db else None

    def add(self, ch: _Chunk, c32: torch.Tensor, dz: torch.Tensor, start: int, stop: int) -> None:
        if self.de is not None:
            self.de[start:stop] = (dz @ c32).to(self.e_dtype)
        if self.dc is not None:
            self.dc += dz.T @ ch.e
        if self.db is not None:
            self.db += dz.sum(0)

    def result(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        return (
            self.de,
            self.dc.to(self.c_dtype) if self.dc is not None else None,
            self.db.to(self.b_dtype) if self.db is not None else None,
        )


def _filter_chunk_rows(chunk_rows: int | None, c: torch.Tensor, grad_filter: GradFilter | None) -> int | None:
    """Chunk rows as given, or, when filtering, rounded to whole row blocks (each block's decision needs all its
    rows; at least one block, so a chunk may exceed the byte budget by up to BM rows)."""
    if grad_filter is None:
        return chunk_rows
    return block_rows(chunk_rows or chunk_rows_for(c.shape[0], default_chunk_bytes(c.device)))


def _chunks(e2d, c, bias, targets_flat, spec: LossSpec, chunk_rows: int | None, logit_scale: float = 1.0):
    """(start, stop, chunk, c32) for each chunk of rows, the fp32 classifier converted once."""
    c32 = c.float()
    b32 = bias.float() if bias is not None else None
    step = chunk_rows or chunk_rows_for(c.shape[0], default_chunk_bytes(c.device))
    for start in range(0, e2d.shape[0], step):
        stop = min(e2d.shape[0], start + step)
        yield start, stop, _Chunk(e2d, c32, b32, targets_flat, spec, start, stop, logit_scale), c32


def forward(
    e2d: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    targets_flat: torch.Tensor,
    spec: LossSpec,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (loss, lse), both fp32 (N,), zero on ignored rows."""
    loss = torch.zeros(e2d.shape[0], dtype=torch.float32, device=e2d.device)
    lse = torch.zeros_like(loss)
    for start, stop, ch, _ in _chunks(e2d, c, bias, targets_flat, spec, chunk_rows):
        loss[start:stop], lse[start:stop] = _chunk_loss(ch, spec, c.shape[0])
    return loss, lse


def backward(
    e2d: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    targets_flat: torch.Tensor,
    spec: LossSpec,
    lse: torch.Tensor,
    grad_loss: torch.Tensor,
    grad_lse: torch.Tensor | None,
    needs: tuple[bool, bool, bool],
    chunk_rows: int | None = None,
    grad_plogp: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    grad_filter: GradFilter | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients (dE, dC, dbias) for upstream per-row gradients ``grad_loss`` and ``grad_lse`` (N,) fp32;
    ``grad_plogp`` and ``logit_scale`` are the per-token statistics' (``stats.py``), absent on the loss path;
    ``grad_filter`` the op's ``filter_eps`` (``filtering.py``), None for the exact gradients."""
    sink = _GradSink(e2d, c, bias, needs)
    chunk_rows = _filter_chunk_rows(chunk_rows, c, grad_filter)
    for start, stop, ch, c32 in _chunks(e2d, c, bias, targets_flat, spec, chunk_rows, logit_scale):
        h = grad_lse[start:stop] if grad_lse is not None else None
        r = grad_plogp[start:stop] if grad_plogp is not None else None
        dz = _chunk_logit_grad(ch, spec, c.shape[0], lse[start:stop], grad_loss[start:stop], h, r, logit_scale,
                               grad_filter)
        sink.add(ch, c32, dz, start, stop)
    return sink.result()


def stats_forward(
    e2d: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    targets_flat: torch.Tensor,
    spec: LossSpec,
    stats: StatsSpec,
    chunk_rows: int | None = None,
):
    """Per-row (log_probs, lse, entropy, log_sum_sq_probs, mean_logits, is_top1) of ``stats.py``, fp32 (bool
    for is_top1), 0 / False on ignored rows; the fields ``stats`` does not ask for are None.

    A chunk holds its logits and up to two more fp32 arrays of its size (log p, p), so its rows are a third of
    the loss path's."""
    n, vocab = e2d.shape[0], c.shape[0]
    zeros = torch.zeros(n, dtype=torch.float32, device=e2d.device)
    log_probs, lse = zeros.clone(), zeros.clone()
    entropy = zeros.clone() if stats.entropy else None
    log_sum_sq = zeros.clone() if stats.log_sum_sq_probs else None
    mean = zeros.clone() if stats.mean_logits else None
    top1 = torch.zeros(n, dtype=torch.bool, device=e2d.device) if stats.is_top1 else None
    step = chunk_rows or max(1, chunk_rows_for(vocab, default_chunk_bytes(c.device)) // 3)
    for start, stop, ch, _ in _chunks(e2d, c, bias, targets_flat, spec, step, stats.logit_scale):
        rows = slice(start, stop)
        row_lse = torch.logsumexp(ch.z, dim=-1)
        keep = ch.valid
        lse[rows] = torch.where(keep, row_lse, 0.0)
        log_probs[rows] = torch.where(keep, ch.z.gather(1, ch.t[:, None]).squeeze(1) - row_lse, 0.0)
        if entropy is not None or log_sum_sq is not None:
            log_p = ch.z - row_lse[:, None]
            if entropy is not None:
                entropy[rows] = torch.where(keep, -(log_p.exp() * log_p).sum(-1), 0.0)
            if log_sum_sq is not None:
                log_sum_sq[rows] = torch.where(keep, torch.logsumexp(2.0 * log_p, dim=-1), 0.0)
            del log_p
        if mean is not None:
            mean[rows] = torch.where(keep, ch.z.mean(-1), 0.0)
        if top1 is not None:  # torch.argmax returns the first maximum
            top1[rows] = keep & (ch.z.argmax(-1) == ch.t)
    return log_probs, lse, entropy, log_sum_sq, mean, top1


def forward_with_grads(
    e2d: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    targets_flat: torch.Tensor,
    spec: LossSpec,
    mean: bool,
    needs: tuple[bool, bool, bool],
    chunk_rows: int | None = None,
    grad_filter: GradFilter | None = None,
):
    """Speed mode on the torch path: the scalar loss is ``weight * sum of counted rows`` with the weight known
    now (1/n_valid for ``mean``, else 1), so each chunk's fp32 logits give its loss and its gradients at once
    (three matmuls per chunk, not four). ``grad_filter`` filters the gradients as ``backward`` does (the loss
    and LSE stay exact).

    Returns (loss_rows, lse_rows, dE, dC, dbias, in_range, weight) as every backend's ``forward_with_grads``;
    ``in_range`` is None: the torch path has no range limit to report."""
    valid = valid_rows(targets_flat, spec)
    weight = loss_weight(valid, mean)
    row_weight = valid.float() * weight
    loss = torch.zeros(e2d.shape[0], dtype=torch.float32, device=e2d.device)
    lse = torch.zeros_like(loss)
    sink = _GradSink(e2d, c, bias, needs)
    chunk_rows = _filter_chunk_rows(chunk_rows, c, grad_filter)
    for start, stop, ch, c32 in _chunks(e2d, c, bias, targets_flat, spec, chunk_rows):
        loss[start:stop], lse[start:stop] = _chunk_loss(ch, spec, c.shape[0])
        dz = _chunk_logit_grad(ch, spec, c.shape[0], lse[start:stop], row_weight[start:stop], None,
                               grad_filter=grad_filter)
        sink.add(ch, c32, dz, start, stop)
    return (loss, lse, *sink.result(), None, weight)


def speed_chunk_rows(n: int, vocab: int, dtype: torch.dtype, chunk_bytes: int) -> int:
    """Rows per chunk of speed mode on this path: the fp32 logits and their gradient fit ``chunk_bytes``."""
    return chunk_rows_for(vocab, chunk_bytes)
