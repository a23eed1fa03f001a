"""Samples the replica's GPUs through NVML (nvidia-ml-py) on a background thread.

A replica without a GPU, or without NVML, gets a sampler that is disabled with a reason; the
gateway logs that reason once and exports no GPU series for that replica.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch


@dataclass
class GpuSample:
    gpu: str  # the GPU's index on its node (NVML's numbering)
    name: str
    power_watts: float
    energy_joules: float  # NVML's counter since the driver loaded
    utilization_ratio: float
    memory_used_bytes: int
    memory_total_bytes: int


class GpuSampler:
    def __init__(self, device: torch.device, interval_s: float = 1.0):
        self.interval_s = interval_s
        self.disabled_reason = ""
        self._handles: list[tuple[str, object]] = []
        self._latest: list[GpuSample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if device.type != "cuda":
            self.disabled_reason = f"the replica runs on {device.type}, so there is no GPU to sample"
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            index = device.index if device.index is not None else torch.cuda.current_device()
            uuid = str(torch.cuda.get_device_properties(index).uuid)
            # NVML numbers all of the node's GPUs; CUDA only the visible ones: match by UUID.
            handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
            # The node's own index: every rank of a replica sees its GPU as cuda:0, NVML does not.
            self._handles.append((str(pynvml.nvmlDeviceGetIndex(handle)), handle))
            self._nvml = pynvml
        except Exception as e:  # NVML missing or refused: no GPU series, never a crash
            self.disabled_reason = f"NVML is unavailable ({type(e).__name__}: {e})"
            return
        self._sample()
        threading.Thread(target=self._loop, name="rtdiff-nvml", daemon=True).start()

    @property
    def enabled(self) -> bool:
        return not self.disabled_reason

    def _sample(self) -> None:
        nv = self._nvml
        out = []
        for gpu, h in self._handles:
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            out.append(GpuSample(
                gpu=gpu,
                name=nv.nvmlDeviceGetName(h),
                power_watts=nv.nvmlDeviceGetPowerUsage(h) / 1000.0,
                energy_joules=nv.nvmlDeviceGetTotalEnergyConsumption(h) / 1000.0,
                utilization_ratio=nv.nvmlDeviceGetUtilizationRates(h).gpu / 100.0,
                memory_used_bytes=int(mem.used),
                memory_total_bytes=int(mem.total),
            ))
        with self._lock:
            self._latest = out

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._sample()
            except Exception:  # a transient NVML error must not kill the thread
                pass

    def latest(self) -> list[GpuSample]:
        with self._lock:
            return list(self._latest)

    def energy_joules(self) -> float | None:
        """Total energy of the replica's GPUs now, read directly (for joules per batch)."""
        if not self.enabled:
            return None
        return sum(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for _, h in self._handles) / 1000.0

    def close(self) -> None:
        self._stop.set()
