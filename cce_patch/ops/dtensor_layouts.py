"""Which layout a DTensor input of the op has: the op's first question about FSDP2 and tensor-parallel inputs.

Why a module of its own: the op (``api.py``) and the model room (``models/sharding.py``) both ask it, before any
compute, and neither needs the vocab-parallel math (``vocab_parallel.py``) to do so. Every layout the op cannot
compute exactly is refused here, naming it: a classifier split over the hidden size, a split over two mesh
dimensions, ``Partial`` placements, a split of e's hidden dimension.
"""

from __future__ import annotations

import sys
from typing import Any

import torch


def has_dtensor(*tensors: torch.Tensor | None) -> bool:
    """True when any argument is a DTensor. Never imports ``torch.distributed.tensor`` (seconds of import time):
    if nothing imported it, no DTensor exists."""
    module = sys.modules.get("torch.distributed.tensor")
    if module is None:
        return False
    return any(t is not None and isinstance(t, module.DTensor) for t in tensors)


def describe_placements(t: Any) -> str:
    """A DTensor's placements and mesh, as the errors name them."""
    return f"placements {tuple(t.placements)} on mesh {tuple(t.device_mesh.shape)} (dims {t.device_mesh.mesh_dim_names})"


def vocab_dim(c: Any) -> int | None:
    """The mesh dimension over which a DTensor classifier is split by rows (None: replicated); raises for any
    other layout, naming it."""
    from torch.distributed.tensor import Replicate, Shard

    shard_dims = []
    for dim, placement in enumerate(c.placements):
        if type(placement) is Shard and placement.dim == 0:
            shard_dims.append(dim)
        elif not isinstance(placement, Replicate):
            raise ValueError(
                f"linear_cross_entropy: the classifier is a DTensor with {describe_placements(c)}; supported layouts are "
                f"Shard(0) (split over the vocabulary: vocab-parallel CCE) on one mesh dimension, the others "
                f"Replicate, or fully Replicate. {placement!r} is not supported"
                + (" (a head split over the hidden size, e.g. RowwiseParallel, needs its partial logits summed "
                   "before the softmax: shard lm_head column-wise instead)" if isinstance(placement, Shard) else "")
            )
    if len(shard_dims) > 1:
        raise ValueError(
            f"linear_cross_entropy: the classifier is a DTensor with {describe_placements(c)}, split over the vocabulary on "
            f"{len(shard_dims)} mesh dimensions (FSDP on top of a tensor-parallel head?); vocab-parallel CCE "
            "splits over one dimension. Gather the head over the data-parallel dimension before the loss "
            "(e.g. keep lm_head in the FSDP root unit)"
        )
    return shard_dims[0] if shard_dims else None


def replicated_local(name: str, t: Any, feature_dim: bool = False) -> Any:
    """The local tensor of ``t`` gathered to every rank (differentiable), or ``t`` itself if it is no DTensor.

    Replicated DTensors are used as they are; DTensors split over token dimensions (sequence parallelism: a
    final norm with ``SequenceParallel``) are all-gathered first, which is exact because the op's gradient for
    them is the same on every rank. A split of e's last (hidden) dimension, or a ``Partial`` placement, is
    refused, naming the layout."""
    if not has_dtensor(t):
        return t
    from torch.distributed.tensor import Replicate, Shard

    for placement in t.placements:
        split_features = feature_dim and isinstance(placement, Shard) and placement.dim % t.dim() == t.dim() - 1
        if split_features or not isinstance(placement, (Replicate, Shard)):
            raise ValueError(
                f"linear_cross_entropy: {name} is a DTensor with {describe_placements(t)}; supported are replicated ones "
                f"and ones split over token dimensions (gathered first), not {placement!r}"
                + (" on the hidden dimension" if split_features else "")
            )
    if all(isinstance(p, Replicate) for p in t.placements):
        return t.to_local()
    return t.redistribute(t.device_mesh, [Replicate()] * t.device_mesh.ndim).to_local()
