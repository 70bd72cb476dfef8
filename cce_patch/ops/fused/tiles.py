"""Launch configuration of the fused kernels: tile shapes, how operands are loaded, compile-time flags.

One place to tune per GPU generation. The launchers (``lse_kernel.py``, ``memory_mode.py``, ``speed_mode.py``)
read these through the module (``tiles.tile_config(...)``), so a tuning script or a test can swap a value in
one place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..precision import fp32_uses_tf32, is_ieee_fp32
from ..spec import LossSpec

try:  # host-side tensor descriptors (Triton >= 3.3); without them the kernels use pointer loads
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton
    TensorDescriptor = None

#: Under TRITON_INTERPRET=1 (CPU tests) bf16/fp16 ``tl.dot`` is unreliable: tiles are upcast to fp32 there,
#: and the tiles are small enough for test shapes to cover partial tiles and several splits.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: Load the matmul tiles through Hopper's tensor memory accelerator where possible (see matmul_operands).
#: H100, paper shape: forward 16.8 -> 14.4 ms, logit-gradient kernel 18.3 -> 17.0 ms (KERNEL_NOTES.md, v3).
USE_TMA = True


@dataclass(frozen=True)
class TileConfig:
    """Tile shape of the logit matmul. 128x256 tiles with K steps of 64 feed Hopper's tensor cores (wgmma)
    with 8 warps; fp32 inputs halve the tile to fit shared memory. ``group_m`` row blocks share each c tile
    (see ``jit_common.grouped_pid``). The interpreter runs on numpy, where fewer and larger programs are
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


def tma_ok(x: torch.Tensor) -> bool:
    """Whether ``x`` (rows x D, contiguous) meets the copy engine's rules: 16-byte aligned base and rows."""
    return (
        x.stride(-1) == 1 and x.stride(0) >= x.shape[1]
        and (x.stride(0) * x.element_size()) % 16 == 0 and x.data_ptr() % 16 == 0
    )


def matmul_operands(e2d: torch.Tensor, c: torch.Tensor, cfg: TileConfig) -> tuple[object, object, bool]:
    """(E, C, use_tma): tensor descriptors for Hopper's copy engine (TMA) when the GPU and the layout allow
    it, else the plain tensors for pointer loads. The interpreter runs both paths (the tests cover each)."""
    if USE_TMA and TensorDescriptor is not None and tma_ok(e2d) and tma_ok(c):
        if INTERPRETING or (e2d.is_cuda and torch.cuda.get_device_capability(e2d.device)[0] >= 9):
            return (
                TensorDescriptor.from_tensor(e2d, [cfg.block_m, cfg.block_k]),
                TensorDescriptor.from_tensor(c, [cfg.block_n, cfg.block_k]),
                True,
            )
    return e2d, c, False


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 2  # the interpreter: a handful of items still exercises the split combination
    return torch.cuda.get_device_properties(device).multi_processor_count


def kernel_flags(e2d: torch.Tensor, bias: torch.Tensor | None, spec: LossSpec, cfg: TileConfig) -> dict:
    """The compile-time flags every logit-tile kernel takes (``jit_common.logit_tile``)."""
    return dict(
        EVEN_K=e2d.shape[1] % cfg.block_k == 0,
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=spec.softcap is not None,
        UPCAST=INTERPRETING and e2d.dtype != torch.float32,
        IEEE_FP32=is_ieee_fp32(e2d.dtype),
    )
