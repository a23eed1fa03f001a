"""Samples the rank's GPU through NVML (nvidia-ml-py) on background threads.

A rank without a GPU, or without NVML, gets a sampler that is disabled with a reason; the gateway
logs that reason once and exports no GPU series for that replica.

Energy per batch is read off the hot path: the compute thread only drops a mark when a batch starts
and ends, and a reader thread reads NVML's energy counter for each mark and adds the difference to
`batch_energy_joules`. A synchronous NVML read cost about 3 ms on the H200 host (measured as 6 ms of
hand-offs per batch, benchmarks/NOTES.md), a fifth of a small frame.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import torch

from rtdiff_cluster.thread_names import set_native_name


def nvml_handle(device: torch.device):
    """(pynvml, the NVML handle of device's GPU), NVML initialised. NVML numbers all of the node's
    GPUs and CUDA only the visible ones, so the two are matched by UUID. Raises where NVML is
    missing or refuses."""
    import pynvml

    pynvml.nvmlInit()
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = str(torch.cuda.get_device_properties(index).uuid)
    return pynvml, pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")


@dataclass
class GpuSample:
    gpu: str  # the GPU's index on its node (NVML's numbering)
    name: str
    power_watts: float
    power_limit_watts: float  # the limit the driver enforces now: "power at limit" alerts compare with it
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
        self._marks: queue.SimpleQueue = queue.SimpleQueue()
        self.batch_energy_joules = 0.0  # summed over the periods with at least one batch in flight
        if device.type != "cuda":
            self.disabled_reason = f"the replica runs on {device.type}, so there is no GPU to sample"
            return
        try:
            pynvml, handle = nvml_handle(device)
            # The node's own index: every rank of a replica sees its GPU as cuda:0, NVML does not.
            self._handles.append((str(pynvml.nvmlDeviceGetIndex(handle)), handle))
            self._nvml = pynvml
        except Exception as e:  # NVML missing or refused: no GPU series, never a crash
            self.disabled_reason = f"NVML is unavailable ({type(e).__name__}: {e})"
            return
        self._sample()
        threading.Thread(target=self._loop, name="rtdiff-nvml", daemon=True).start()
        threading.Thread(target=self._read_marks, name="rtdiff-nvml-energy", daemon=True).start()

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
                power_limit_watts=nv.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0,
                energy_joules=nv.nvmlDeviceGetTotalEnergyConsumption(h) / 1000.0,
                utilization_ratio=nv.nvmlDeviceGetUtilizationRates(h).gpu / 100.0,
                memory_used_bytes=int(mem.used),
                memory_total_bytes=int(mem.total),
            ))
        with self._lock:
            self._latest = out

    def _loop(self) -> None:
        set_native_name()
        while not self._stop.wait(self.interval_s):
            try:
                self._sample()
            except Exception:  # a transient NVML error must not kill the thread
                pass

    def latest(self) -> list[GpuSample]:
        with self._lock:
            return list(self._latest)

    def _energy(self) -> float:
        return sum(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for _, h in self._handles) / 1000.0

    def mark_batch(self, started: bool) -> None:
        """From the compute thread: a batch starts (True) or ends (False). Costs a queue put."""
        if self.enabled:
            self._marks.put(started)

    def _read_marks(self) -> None:
        # Batches overlap (the next one is launched while the last one's GPU work runs): energy is
        # counted while at least one is in flight, from the first start to the last end.
        set_native_name()
        start, active = None, 0
        while not self._stop.is_set():
            started = self._marks.get()
            active = active + 1 if started else max(0, active - 1)
            if active > (1 if started else 0):  # inside a busy period: no counter read needed
                continue
            try:
                now = self._energy()
            except Exception:  # a transient NVML error loses one busy period's energy, nothing more
                start = None
                continue
            if started:
                start = now
            elif active == 0 and start is not None:
                with self._lock:
                    self.batch_energy_joules += now - start
                start = None

    def close(self) -> None:
        self._stop.set()
        self._marks.put(False)
