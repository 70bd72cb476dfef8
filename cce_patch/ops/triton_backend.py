"""Triton backend of ``linear_cross_entropy``: launch configuration, dS chunking, cuBLAS GEMMs.

Forward: one fused kernel (``triton_forward.lse_forward_kernel``) streams e @ c.T tile by tile and keeps only
per-row statistics, so no logit is ever stored. Backward: for each vocabulary chunk (and, past 16k tokens,
each row group inside it: ``ds_chunk_shape``), a fused kernel recomputes the logit tile and writes the logit
gradient dS (``triton_backward.logit_grad_kernel``); then cuBLAS computes dC[chunk] = dS^T e (written in
place, or summed over the row groups in fp32 first) and dE += dS c[chunk] (fp32 accumulator). Exact
gradients: nothing is filtered or skipped except rows whose targets are ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import triton

from .gemm import mm_accumulate, mm_into
from .precision import fp32_uses_tf32, is_ieee_fp32
from .reference import effective_targets
from .spec import LossSpec
from .triton_backward import logit_grad_kernel
from .triton_common import INTERPRETING
from .triton_forward import combine_partials, lse_forward_kernel

try:  # host-side tensor descriptors (Triton >= 3.3); without them the kernels use pointer loads
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton
    TensorDescriptor = None

#: Bytes allowed for one chunk of the logit gradient dS. 128 MiB keeps fwd+bwd memory at the paper shape
#: (N=8192, V=256000, bf16) within 1.25x of the gradients (8192 x 8192 x 2 B = 128 MiB per chunk).
DS_CHUNK_BYTES = 128 * 1024 * 1024
#: Forward work items to aim for, in waves of one program per SM (a 128x256 fp32 accumulator fills an SM).
#: Many short items keep the last wave's idle tail small (the first design gave each program 1/9 of the
#: vocabulary: 576 items = 4.4 waves on 132 SMs, a fifth wave 36% full), while the per-split partials stay at
#: ~8 B x BLOCK_M x items whatever N is (~4 MB at BLOCK_M=128).
FWD_WAVES = 32
#: Load the matmul tiles through Hopper's tensor memory accelerator where possible (see _matmul_operands).
#: H100, paper shape: forward 16.8 -> 14.4 ms, logit-gradient kernel 18.3 -> 17.0 ms (KERNEL_NOTES.md, v3).
USE_TMA = True
#: With TMA, run the forward as one flat loop over (vocab tile, K step) so that the next tile's loads stay in
#: flight across the epilogue: 14.4 -> 13.9 ms. With pointer loads it is slower (16.8 -> 19.1), so it is off there.
FWD_FLAT_LOOP = True
#: Speed mode writes q through the copy engine (an asynchronous bulk store from shared memory) instead of
#: pointer stores from registers. H100, paper shape: speed fwd+bwd 48.2 -> 46.3 ms (lm), 51.0 -> 48.7 (peaked).
#: The same store for memory mode's dS (3 pipeline stages, to fit the 64 KB staging tile) was slower:
#: 57.0 -> 60.9 ms (lm), 62.3 -> 63.6 (peaked), so dS keeps pointer stores (KERNEL_NOTES.md, v5).
Q_TMA_STORE = True


@dataclass(frozen=True)
class TileConfig:
    """Tile shape of the logit matmul. 128x256 tiles with K steps of 64 feed Hopper's tensor cores (wgmma)
    with 8 warps; fp32 inputs halve the tile to fit shared memory. ``group_m`` row blocks share each c tile
    (see ``triton_common.grouped_pid``). The interpreter runs on numpy, where fewer and larger programs are
    cheaper, but tiles must stay small enough for the test shapes to cover partial tiles and several splits."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 32


def tile_config(dtype: torch.dtype, kernel: str = "forward") -> TileConfig:
    """Tiles for ``kernel`` ("forward", "store": the forward writing speed mode's q, or "backward") at
    ``dtype``; one place to tune per GPU generation."""
    if INTERPRETING:
        return TileConfig(32, 64, 32, 4, 1, group_m=2)
    if dtype == torch.float32:
        if fp32_uses_tf32() and kernel != "store":
            # TF32 (opted in), H100, paper shape (profile_modes.py --fp32-tiles): the bf16 tile's bytes per K
            # step, 128x256x32, run the forward in 27.7 ms instead of 41.5 and memory mode's fwd+bwd in 139.5
            # instead of 155.1. The storing kernel keeps 128x128: with its fp32 q staging tile, 128x256 needs
            # 272 KB of shared memory.
            return TileConfig(128, 256, 32, 8, 4 if kernel == "backward" else 3)
        return TileConfig(128, 128, 32, 8, 3)
    # Measured on H100 at N=8192, D=2304, V=256000 (tests/gpu/tune_tiles.py, KERNEL_NOTES.md): 128x256x64 with
    # 8 warps beats 128x128 (one or two programs per SM) and 256x128 by 1-3 ms in both kernels; 3 stages are
    # best for the forward, 4 for the logit-gradient kernel (16.7 vs 17.0 ms).
    return TileConfig(128, 256, 64, 8, 4 if kernel == "backward" else 3)


def _tma_ok(x: torch.Tensor) -> bool:
    """Whether ``x`` (rows x D, contiguous) meets the copy engine's rules: 16-byte aligned base and rows."""
    return (
        x.stride(-1) == 1 and x.stride(0) >= x.shape[1]
        and (x.stride(0) * x.element_size()) % 16 == 0 and x.data_ptr() % 16 == 0
    )


def _matmul_operands(e2d: torch.Tensor, c: torch.Tensor, cfg: TileConfig) -> tuple[object, object, bool]:
    """(E, C, use_tma): tensor descriptors for Hopper's copy engine (TMA) when the GPU and the layout allow
    it, else the plain tensors for pointer loads. The interpreter runs both paths (the tests cover each)."""
    if USE_TMA and TensorDescriptor is not None and _tma_ok(e2d) and _tma_ok(c):
        if INTERPRETING or (e2d.is_cuda and torch.cuda.get_device_capability(e2d.device)[0] >= 9):
            return (
                TensorDescriptor.from_tensor(e2d, [cfg.block_m, cfg.block_k]),
                TensorDescriptor.from_tensor(c, [cfg.block_n, cfg.block_k]),
                True,
            )
    return e2d, c, False


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 2  # the interpreter: a handful of items still exercises the split combination
    return torch.cuda.get_device_properties(device).multi_processor_count


def _flags(e2d: torch.Tensor, bias: torch.Tensor | None, spec: LossSpec, cfg: TileConfig) -> dict:
    return dict(
        EVEN_K=e2d.shape[1] % cfg.block_k == 0,
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=spec.softcap is not None,
        UPCAST=INTERPRETING and e2d.dtype != torch.float32,
        IEEE_FP32=is_ieee_fp32(e2d.dtype),
    )


def launch_forward(e2d, c, bias, targets_flat, spec: LossSpec, q: torch.Tensor | None = None,
                   mref: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel: per-split partials (m, s[, zsum]) and the target logits zt.

    With ``q`` and ``mref`` (speed mode), the kernel also writes q = exp(z - mref) for every logit into ``q``
    (rows x V view, unit column stride)."""
    n, d = e2d.shape
    v = c.shape[0]
    cfg = tile_config(e2d.dtype, "forward" if q is None else "store")
    row_blocks = triton.cdiv(n, cfg.block_m)
    vocab_tiles = triton.cdiv(v, cfg.block_n)
    splits = max(1, min(vocab_tiles, triton.cdiv(FWD_WAVES * _num_sms(e2d.device), row_blocks)))
    tiles_per_split = triton.cdiv(vocab_tiles, splits)
    splits = triton.cdiv(vocab_tiles, tiles_per_split)  # every split starts inside the vocabulary
    need_zsum = spec.label_smoothing > 0
    part = torch.empty((3 if need_zsum else 2, splits, n), dtype=torch.float32, device=e2d.device)
    zt = torch.zeros(n, dtype=torch.float32, device=e2d.device)
    e_arg, c_arg, use_tma = _matmul_operands(e2d, c, cfg)
    store_q = q is not None
    q_arg = q if store_q else e2d
    if store_q and use_tma and Q_TMA_STORE and _tma_ok(q):  # asynchronous bulk store of each q tile
        q_arg = TensorDescriptor.from_tensor(q, [cfg.block_m, cfg.block_n])
    lse_forward_kernel[(row_blocks * splits,)](
        e_arg, c_arg, bias if bias is not None else e2d, targets_flat, part, zt,
        q_arg, mref if store_q else zt, q.stride(0) if store_q else 0,
        n, v, d, e2d.stride(0), c.stride(0), spec.shift_period, spec.ignore_index,
        float(spec.softcap or 1.0), tiles_per_split, splits, cfg.group_m,
        NEED_ZSUM=need_zsum, STORE_Q=store_q, Q_IS_DESC=store_q and q_arg is not q,
        USE_TMA=use_tma, FLAT_LOOP=FWD_FLAT_LOOP and use_tma, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_flags(e2d, bias, spec, cfg),
    )
    return part, zt


def triton_forward(e2d, c, bias, targets_flat, spec: LossSpec):
    """Per-row (loss, lse), fp32 (N,), zero on ignored rows."""
    part, zt = launch_forward(e2d, c, bias, targets_flat, spec)
    valid = _valid_rows(targets_flat, spec, e2d.shape[0])
    return combine_partials(part, zt, valid, spec.label_smoothing, c.shape[0])


def _valid_rows(targets_flat: torch.Tensor, spec: LossSpec, n: int) -> torch.Tensor:
    from .reference import valid_rows

    return valid_rows(targets_flat, spec)[:n]


def ds_chunk_shape(n: int, v: int, itemsize: int, budget: int, cfg: TileConfig) -> tuple[int, int]:
    """(rows, columns) of one dS chunk of at most ``budget`` bytes: the backward's unit of work.

    Why two dimensions: every vocabulary chunk reads and writes the fp32 dE accumulator of its rows once
    (rows x D x 8 B), and with row groups every row group reads and writes the fp32 dC accumulator of its
    columns once. Over the whole problem that is 8 N D V (1/cols + 1/rows) bytes, smallest for a square chunk.
    Taking all N rows at once (one row group, dC written straight into the gradient, no dC accumulator) is
    as good up to N = 2 sqrt(budget / itemsize) = 16,384 for 128 MiB of bf16 (and saves the dC accumulator);
    beyond it a fixed budget would shrink the columns as 1/N and make the accumulator traffic grow as N^2
    (measured: +22% time per token at N=65,536 with 1,024-column chunks). So past that, rows come in balanced
    groups of at most the square side."""
    side = max(cfg.block_m, math.isqrt(max(1, budget // itemsize)) // cfg.block_m * cfg.block_m)
    # One group costs n / budget per element of N D V, groups of `side` rows 2 / side: equal at n = 2 side.
    groups = 1 if n <= 2 * side else triton.cdiv(n, side)
    rows = n if groups == 1 else triton.cdiv(triton.cdiv(n, groups), cfg.block_m) * cfg.block_m
    cols = max(cfg.block_n, budget // (rows * itemsize) // cfg.block_n * cfg.block_n)
    return rows, min(cols, triton.cdiv(v, cfg.block_n) * cfg.block_n)


def _fp16_scale(e2d, grad_loss, grad_lse):
    """fp16 has a narrow range: g * (p - onehot) with g = 1/N and p ~ 1/V is far below its smallest normal.
    The kernel stores dS / max|g| instead (entries of order p - onehot) and the GEMM results are multiplied
    back. bf16 and fp32 share fp32's exponent range and need no scale. Returns (scale or None, g, h)."""
    if e2d.dtype != torch.float16:
        return None, grad_loss, grad_lse
    peak = grad_loss.abs().max()
    if grad_lse is not None:
        peak = torch.maximum(peak, grad_lse.abs().max())
    scale = peak.clamp_min(torch.finfo(torch.float32).tiny)
    return scale, grad_loss / scale, (grad_lse / scale if grad_lse is not None else None)


def triton_backward(e2d, c, bias, targets_flat, spec: LossSpec, lse, grad_loss, grad_lse, needs):
    """(dE, dC, dbias) in the input dtypes, for those in ``needs``.

    Loops over vocabulary chunks and, when N is large, row groups within each chunk (``ds_chunk_shape``):
    the kernel writes dS for (row group, chunk), then cuBLAS adds dS c[chunk] into the fp32 dE accumulator
    of the group's rows and dS^T e[group] into dC[chunk] (directly with one row group, else through an fp32
    chunk accumulator that is rounded into dC once the chunk's last group is done)."""
    need_de, need_dc, need_db = needs
    n, d = e2d.shape
    v = c.shape[0]
    cfg = tile_config(e2d.dtype, "backward")
    rows, cols = ds_chunk_shape(n, v, e2d.element_size(), DS_CHUNK_BYTES, cfg)
    grouped = rows < n
    if grouped:  # group boundaries need not fall on sequence boundaries: shift once, then unshifted groups
        targets_flat = effective_targets(targets_flat, spec)
        spec = replace(spec, shift_period=0)
    ds_buf = torch.empty((rows, cols), dtype=e2d.dtype, device=e2d.device)
    de_acc = torch.empty((n, d), dtype=torch.float32, device=e2d.device) if need_de else None
    dc = torch.empty_like(c) if need_dc else None
    dc_acc = torch.empty((cols, d), dtype=torch.float32, device=c.device) if need_dc and grouped else None
    db_acc = torch.zeros(v, dtype=torch.float32, device=bias.device) if need_db else None
    scale, grad_loss, grad_lse = _fp16_scale(e2d, grad_loss, grad_lse)
    # (first row, end row, tile operands) per row group; descriptors are built once, not per chunk
    groups = [(r0, min(n, r0 + rows), _matmul_operands(e2d[r0:r0 + rows], c, cfg)) for r0 in range(0, n, rows)]
    for v0 in range(0, v, cols):
        width = min(cols, v - v0)
        for r0, r1, (e_arg, c_arg, use_tma) in groups:
            ds = ds_buf[: r1 - r0, :width]
            logit_grad_kernel[(triton.cdiv(r1 - r0, cfg.block_m) * triton.cdiv(width, cfg.block_n),)](
                e_arg, c_arg, bias if bias is not None else e2d, targets_flat[r0:], lse[r0:], grad_loss[r0:],
                grad_lse[r0:] if grad_lse is not None else grad_loss, ds,
                r1 - r0, v, d, e2d.stride(0), c.stride(0), ds_buf.stride(0), v0, width, spec.shift_period,
                spec.ignore_index, float(spec.softcap or 1.0), float(spec.label_smoothing), 1.0 / v, cfg.group_m,
                HAS_H=grad_lse is not None, USE_TMA=use_tma, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                **_flags(e2d, bias, spec, cfg),
            )
            if dc_acc is not None:
                mm_accumulate(dc_acc[:width], ds.T, e2d[r0:r1], first=r0 == 0)
            elif dc is not None:
                mm_into(dc[v0:v0 + width], ds.T, e2d, scale)
            if de_acc is not None:
                mm_accumulate(de_acc[r0:r1], ds, c[v0:v0 + width], first=v0 == 0)
            if db_acc is not None:
                db_acc[v0:v0 + width] += torch.sum(ds, 0, dtype=torch.float32)
        if dc_acc is not None:  # the chunk's last row group is in: round its columns of dC once
            dc[v0:v0 + width] = (dc_acc[:width] * scale if scale is not None else dc_acc[:width]).to(dc.dtype)
    if scale is not None:
        for acc in (de_acc, db_acc):
            if acc is not None:
                acc.mul_(scale)
    de = de_acc.to(e2d.dtype) if de_acc is not None else None
    db = db_acc.to(bias.dtype) if db_acc is not None else None
    return de, dc, db
