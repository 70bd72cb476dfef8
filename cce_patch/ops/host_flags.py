"""Small device results the host must read, fetched without draining the GPU's queue.

Why: ``.item()``/``.tolist()`` on a CUDA tensor waits for *everything* queued on the stream, so the GPU runs
dry while the host does whatever comes next (launch preparation, the autograd hand-off). The op needs two
such answers per call: whether the targets are in range and, in speed mode, whether every row fit the
stored range. Each is copied into pinned host memory behind a CUDA event as soon as it is computed; the
host waits on that event only, by which time the next kernels are already queued behind it.
"""

from __future__ import annotations

import torch


class HostFlags:
    """A few device values on their way to the host; ``read()`` waits for them, not for later work."""

    def __init__(self, values: torch.Tensor) -> None:
        if values.is_cuda:
            self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self._host.copy_(values, non_blocking=True)
            self._ready: torch.cuda.Event | None = torch.cuda.Event()
            self._ready.record()
        else:
            self._host, self._ready = values, None

    def read(self) -> list:
        """The values as Python numbers; blocks until the copy (and only what was queued before it) is done."""
        if self._ready is not None:
            self._ready.synchronize()
        return self._host.tolist()
