"""Host frames (uint8 arrays) to a device through pinned staging buffers: one DMA per upload instead of a copy
through the driver's pageable bounce buffers (0.5-1 ms for a 1024 frame on the H200's host).

A buffer is kept per shape (the least recently used shape goes beyond `max_shapes`) and is
refilled only once its last upload has finished: the batch that used it may still be running
when the next one is prepared (engine/pipeline.py launches batches without waiting for them).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch


class PinnedUploads:
    def __init__(self, device: torch.device | str, max_shapes: int):
        self.device = torch.device(device)
        self.max_shapes = max_shapes
        self._buffers: OrderedDict[tuple, tuple[torch.Tensor, torch.cuda.Event]] = OrderedDict()

    @property
    def nbytes(self) -> int:
        return sum(buf.numel() * buf.element_size() for buf, _ in self._buffers.values())

    def upload(self, arrays: list[np.ndarray]) -> torch.Tensor:
        """The uint8 arrays stacked, [len(arrays), *shape], on the device. Off CUDA: a plain copy."""
        if self.device.type != "cuda":
            return torch.from_numpy(np.stack(arrays)).to(self.device)
        shape = (len(arrays), *arrays[0].shape)
        buf, uploaded = self._buffers.pop(shape, (None, None))
        if buf is None:
            buf = torch.empty(shape, dtype=torch.uint8, pin_memory=True)
            if len(self._buffers) >= self.max_shapes:
                self._buffers.popitem(last=False)
        else:
            uploaded.synchronize()
        view = buf.numpy()
        for i, a in enumerate(arrays):
            view[i] = a
        out = buf.to(self.device, non_blocking=True)
        uploaded = torch.cuda.Event()
        uploaded.record()
        self._buffers[shape] = (buf, uploaded)
        return out


def to_device_async(host: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A small host tensor on the device in dtype, without PyTorch's blocking copy (a copy plus a
    stream synchronisation, which waits for every batch still running: engine/pipeline.py launches
    the next batch while one runs). Through the caching host allocator's pinned memory, which it
    reuses only once the copy is done."""
    if device.type == "cuda":
        host = host.pin_memory().to(device, non_blocking=True)
    return host.to(device, dtype)
