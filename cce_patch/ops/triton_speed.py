"""Speed mode on the Triton backend: exact gradients formed during the forward pass, nothing recomputed.

When the loss is a scalar (mean or sum), the upstream gradient of every row is known up to one scalar
before the backward pass: w_i = 1/n_valid (mean) or 1 (sum), times the final grad_output. So the gradient
can be formed while the logits are being computed, and the backward's recompute of the logits (a fourth
GEMM of N x D x V) disappears. Per chunk of token rows (sized by a byte budget), with z = softcap(e c^T + b):

    1. mref_i = z_{i,t_i}, the target logit (a cheap gather-dot). It is a lower bound of the row max, and
       max_j z_ij - mref_i <= lse_i - mref_i = the row's loss.
    2. The forward kernel streams the vocabulary as usual (lse, zt) and also stores
       q_ij = exp(z_ij - mref_i) [* softcap derivative] in the input dtype. Its reference does not move
       while the kernel runs, so one scalar per row turns q into probabilities: p_ij = q_ij * a_i with
       a_i = exp(mref_i - lse_i) (= p_{i,t_i}).
    3. The target entry is overwritten with (p_t - (1 - eps)) * f_t / a_i, computed in fp32 from zt and lse:
       p_t - 1 is formed before any rounding (storing p_t alone and subtracting 1 later would cancel
       catastrophically for confident rows).
    4. cuBLAS, with s_i = w_i * a_i:   dE[rows] = s * (Q @ C)            (fp32 output, one rounding)
                                       dC      += Q^T @ (s * E[rows])    (bf16/fp32, in place)
                                       db      += Q^T s
       plus the dense label-smoothing terms, which are rank one.

Three GEMMs in all (the 3-GEMM floor), and the logit gradient is rounded exactly once, as in the
recompute path. Memory: the q chunk (rows x V in the input dtype) on top of the gradients.

Range: bf16 and fp32 hold exp(x) for x in about [-87, 88]. Logits within 87 nats of the row max keep full
relative precision; q overflows only if a row's max exceeds its target logit by more than 88, i.e. its
loss exceeds that. Rows with loss > ``SPEED_RANGE`` (64 nats, p_target < 2e-28) are detected after the
launch and the whole call falls back to the recompute path (see ``speed.py``). fp16's range (~[-10, 11]
in exp) is far too narrow for this, so speed mode refuses fp16 inputs.
"""

from __future__ import annotations

import torch
import triton

from .spec import LossSpec
from .triton_backend import launch_forward, tile_config
from .triton_forward import combine_partials

#: Largest loss (lse - target logit, in nats) a row may have for speed mode's stored q to be safe: q stays
#: below e^64 (bf16/fp32 overflow at e^88.7) and the row scale w * e^-64 stays a normal fp32 number.
SPEED_RANGE = 64.0


def effective_targets(targets_flat: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """(N,) int64 target of each row after the causal shift, ``ignore_index`` where the row does not count.

    The speed path slices rows into chunks; with the shift applied up front, every chunk is an unshifted
    problem (``shift_period=0``) and chunk boundaries need not fall on sequence boundaries."""
    from .reference import _row_targets

    t = _row_targets(targets_flat, 0, targets_flat.numel(), spec.shift_period)
    valid = (t != spec.ignore_index) & (t >= 0)
    return torch.where(valid, t, torch.full_like(t, spec.ignore_index))


def target_logits(e: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None, t_safe: torch.Tensor,
                  softcap: float | None) -> torch.Tensor:
    """fp32 z_{i,t_i} by a gather and a row-wise dot (rows x D work, negligible next to the GEMMs)."""
    z = (e.float() * c[t_safe].float()).sum(-1)
    if bias is not None:
        z = z + bias[t_safe].float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def new_q_buffer(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised q storage: the kernel writes every element the GEMMs read (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result and no intermediate rounding (cuBLAS out_dtype; upcast on CPU)."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def _mm_accumulate(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """out = a @ b (first chunk) or out += a @ b, in out's dtype (cuBLAS beta=1: fp32 math, one rounding)."""
    if a.is_cuda or a.dtype == torch.float32:
        if first:
            torch.mm(a, b, out=out)
        else:
            out.addmm_(a, b)
    else:  # the CPU interpreter path: half-precision GEMMs upcast (test shapes only)
        prod = a.float() @ b.float()
        out.copy_(prod if first else out.float() + prod)


def triton_forward_with_grads(
    e2d: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    targets_flat: torch.Tensor,
    spec: LossSpec,
    row_weight: torch.Tensor,
    needs: tuple[bool, bool, bool],
    chunk_rows: int,
):
    """(loss_rows, lse_rows, dE, dC, dbias, in_range) for the scalar loss sum_i w_i * loss_i.

    ``in_range`` is a 0-dim bool tensor (not synced here): False when some row's loss exceeds SPEED_RANGE,
    in which case the gradients are not to be used."""
    need_de, need_dc, need_db = needs
    n, d = e2d.shape
    v = c.shape[0]
    dtype = e2d.dtype
    eps, cap = spec.label_smoothing, spec.softcap
    tgt = effective_targets(targets_flat, spec)
    valid = tgt != spec.ignore_index
    chunk_spec = LossSpec(ignore_index=spec.ignore_index, softcap=cap, label_smoothing=eps, shift_period=0)
    v_pad = triton.cdiv(v, 8) * 8  # 16-byte aligned rows of q for vector stores and cuBLAS
    q_buf = new_q_buffer((min(chunk_rows, n), v_pad), dtype, e2d.device)
    loss = torch.empty(n, dtype=torch.float32, device=e2d.device)
    lse = torch.empty(n, dtype=torch.float32, device=e2d.device)
    worst = torch.zeros((), dtype=torch.float32, device=e2d.device)
    de = torch.empty_like(e2d) if need_de else None
    dc = torch.empty_like(c) if need_dc else None
    db = torch.zeros(v, dtype=torch.float32, device=e2d.device) if need_db else None
    c_colsum = c.float().sum(0) if (eps and need_de) else None
    smooth_dc = torch.zeros(d, dtype=torch.float32, device=e2d.device) if (eps and need_dc) else None
    for r0 in range(0, n, chunk_rows):
        r1 = min(n, r0 + chunk_rows)
        rows = r1 - r0
        e_c, t_c, ok_c, w_c = e2d[r0:r1], tgt[r0:r1], valid[r0:r1], row_weight[r0:r1]
        t_safe = torch.where(ok_c, t_c, torch.zeros_like(t_c))
        mref = torch.where(ok_c, target_logits(e_c, c, bias, t_safe, cap), torch.full_like(w_c, float("inf")))
        q = q_buf[:rows, :v]
        part, zt = launch_forward(e_c, c, bias, t_c, chunk_spec, q=q, mref=mref)
        loss_c, lse_c = combine_partials(part, zt, ok_c, eps, v)
        loss[r0:r1], lse[r0:r1] = loss_c, lse_c
        gap = torch.where(ok_c, lse_c - mref, torch.zeros_like(lse_c))
        worst = torch.maximum(worst, gap.max())
        gap = gap.clamp_max(SPEED_RANGE)  # out-of-range rows are discarded anyway; keep the math finite
        a = torch.exp(-gap)  # p_{i,t_i} measured against mref: exp(mref - lse)
        coef = torch.exp(zt - lse_c) - (1.0 - eps)
        if cap is not None:
            coef = coef * (1.0 - (zt / cap) ** 2)
        q[torch.arange(rows, device=q.device), t_safe] = torch.where(ok_c, coef / a, 0.0).to(dtype)
        s = torch.where(ok_c, w_c * a, 0.0)
        if de is not None:
            prod = _mm_fp32(q, c).mul_(s[:, None])
            if eps:
                prod.sub_((w_c * (eps / v))[:, None] * c_colsum)
            de[r0:r1] = prod.to(dtype)
        if dc is not None:
            _mm_accumulate(dc, q.T, (e_c.float() * s[:, None]).to(dtype), first=r0 == 0)
            if eps:
                smooth_dc += w_c @ e_c.float()
        if db is not None:
            db += _mm_fp32(q.T, s[:, None].to(dtype)).squeeze(1)
            if eps:
                db -= (eps / v) * w_c.sum()
    if smooth_dc is not None:
        dc.sub_(((eps / v) * smooth_dc).to(dtype))
    return loss, lse, de, dc, (db.to(bias.dtype) if db is not None else None), worst <= SPEED_RANGE


def default_chunk_rows(n: int, v: int, dtype: torch.dtype, chunk_bytes: int) -> int:
    """Rows per chunk so that q (rows x V) fits ``chunk_bytes``; chunks are balanced and rounded up to whole
    row blocks, and never fewer than one block."""
    block = tile_config(dtype).block_m
    itemsize = torch.empty((), dtype=dtype).element_size()
    cap = max(block, chunk_bytes // (triton.cdiv(v, 8) * 8 * itemsize))
    chunks = triton.cdiv(n, cap)
    return max(block, triton.cdiv(triton.cdiv(n, chunks), block) * block)

