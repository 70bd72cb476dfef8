"""The cuBLAS products of the Triton backend's backward passes, with control over where rounding happens.

Both modes hand the two big gradient GEMMs (dC = dS^T E and dE = dS C, or their speed-mode forms) to cuBLAS
and fuse only the elementwise work into Triton. What decides their accuracy is the dtype a partial product
is stored in: cuBLAS can write an fp32 result from bf16/fp16 operands (``out_dtype``), so a sum over chunks
is rounded to the input dtype once, at the end. The CPU has no such kernel, so under the Triton interpreter
(test shapes only) half-precision operands are upcast instead.
"""

from __future__ import annotations

import torch


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as a new fp32 tensor, with no intermediate rounding."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def mm_accumulate(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """out = a @ b (``first``) or out += a @ b, in out's dtype: cuBLAS computes in fp32 and rounds once per
    call, so an fp32 ``out`` with half-precision operands holds an unrounded running sum."""
    beta = 0.0 if first else 1.0
    if out.dtype != a.dtype and a.is_cuda:
        torch.addmm(out, a, b, beta=beta, out_dtype=torch.float32, out=out)
    elif a.is_cuda or a.dtype == torch.float32:
        torch.addmm(out, a, b, beta=beta, out=out)
    else:  # the interpreter path: half-precision GEMMs upcast
        prod = a.float() @ b.float()
        out.copy_(prod if first else out.float() + prod)


def mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | None) -> None:
    """out = scale * (a @ b), out possibly a slice of a gradient. With a scale (fp16 only, see
    ``memory_mode``), the product is formed in fp32 first, so that undoing the scale cannot overflow fp16."""
    if scale is None:
        if a.is_cuda or a.dtype == torch.float32:
            torch.mm(a, b, out=out)
        else:
            out.copy_(a.float() @ b.float())
        return
    out.copy_(mm_fp32(a, b).mul_(scale))
