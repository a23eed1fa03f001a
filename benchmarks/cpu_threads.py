"""Which threads of a server and its clients burn the CPU while a benchmark runs, from /proc (Linux).

A process tree (the server, its Ray runtime and replica workers, the client) is sampled every
`interval_s`: each thread's user+system CPU time (/proc/PID/task/TID/stat) and name (its comm:
our threads name themselves, rtdiff_cluster/thread_names.py; Ray's and gRPC's C++ threads name
themselves too). `busiest(t0, t1)` turns the two samples nearest a window's ends into cores per
thread. A replica whose Python threads together hold about one core is bound by its GIL; a
thread alone near one core is bound by itself. On a CUDA device NVML's GPU utilization (the
fraction of time a kernel ran) is sampled beside, so the same window says whether the GPU waited.

    sampler = ThreadSampler([os.getpid()]).start()  # this process and all it starts
    r = sampler.busiest(t0, t1)  # {"threads": [{"process", "pid", "thread", "cores"}, ...] busiest first,
                                 #  "processes": [...], "gpu_busy_pct": ..., "window_s": ...}
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_fields(path: Path) -> list[str] | None:
    """A /proc stat line split after its "(comm)" (which may hold spaces): fields 3.. of proc(5)."""
    try:
        text = path.read_text()
    except OSError:  # the task ended between listing and reading
        return None
    return text[text.rindex(")") + 2:].split()


def _comm(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return "?"


def descendants(roots: list[int]) -> list[int]:
    """The roots and every process below them, from each process's parent id."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (f := _stat_fields(d / "stat")):
            children.setdefault(int(f[1]), []).append(int(d.name))  # field 4: ppid
    out, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.append(pid)
            todo += children.get(pid, [])
    return out


def _process_label(pid: int) -> str:
    """Ray renames its workers (`ray::EngineRank`); a Python process is named by its module or script."""
    comm = _comm(Path(f"/proc/{pid}/comm"))
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return comm
    args = [a.decode(errors="replace") for a in argv if a]
    if args and args[0].startswith("ray::"):
        return args[0].split()[0]
    if comm.startswith("python") and len(args) > 1:
        rest = args[1:]
        if rest[0] == "-m" and len(rest) > 1:
            sub = next((a for a in rest[2:] if not a.startswith("-")), "")
            return f"{rest[1]} {sub}".strip()
        return Path(rest[0]).name
    return comm


def snapshot(pids: list[int]) -> dict[tuple[int, int], tuple[str, str, float]]:
    """(pid, tid) -> (process label, thread name, CPU seconds so far) for every thread of pids."""
    out = {}
    for pid in pids:
        label = _process_label(pid)
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            task = Path(f"/proc/{pid}/task/{tid}")
            f = _stat_fields(task / "stat")
            if f:  # fields 14 and 15 of proc(5): utime, stime in clock ticks
                out[(pid, int(tid))] = (label, _comm(task / "comm"), (int(f[11]) + int(f[12])) / CLOCK_TICKS)
    return out


class ThreadSampler:
    def __init__(self, roots: list[int], interval_s: float = 0.2, gpu_index: int | None = None):
        self.roots = list(roots)
        self.interval_s = interval_s
        self.samples: list[tuple[float, dict, float | None]] = []  # (monotonic time, snapshot, GPU busy %)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-threads", daemon=True)
        self._nvml = None
        if gpu_index is not None:
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = (pynvml, pynvml.nvmlDeviceGetHandleByIndex(gpu_index))
            except Exception:  # no NVML: the CPU side alone
                self._nvml = None

    def start(self) -> ThreadSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            gpu = None
            if self._nvml:
                nv, handle = self._nvml
                try:
                    gpu = float(nv.nvmlDeviceGetUtilizationRates(handle).gpu)
                except Exception:
                    gpu = None
            self.samples.append((time.monotonic(), snapshot(descendants(self.roots)), gpu))
            self._stop.wait(self.interval_s)

    def busiest(self, t0: float, t1: float, min_cores: float = 0.02) -> dict:
        """Cores per thread between the samples nearest t0 and t1 (time.monotonic()), busiest
        first, those under min_cores left out; per-process totals; the mean GPU utilization of the
        samples between."""
        samples = list(self.samples)
        if len(samples) < 2:
            return {"window_s": 0.0, "threads": [], "processes": [], "gpu_busy_pct": None}
        a = min(samples, key=lambda s: abs(s[0] - t0))
        b = min(samples, key=lambda s: abs(s[0] - t1))
        if b[0] <= a[0]:
            a, b = samples[-2], samples[-1]
        span = b[0] - a[0]
        threads, processes = [], {}
        for key, (label, name, cpu) in b[1].items():
            cores = (cpu - (a[1][key][2] if key in a[1] else 0.0)) / span
            proc = processes.setdefault(key[0], {"process": label, "pid": key[0], "cores": 0.0, "threads": 0})
            proc["cores"] += cores
            proc["threads"] += 1
            if cores >= min_cores:
                threads.append({"process": label, "pid": key[0], "thread": name, "cores": cores})
        gpu = [g for t, _, g in samples if a[0] <= t <= b[0] and g is not None]
        return {"window_s": span, "threads": sorted(threads, key=lambda r: -r["cores"]),
                "processes": sorted((p for p in processes.values() if p["cores"] >= min_cores), key=lambda r: -r["cores"]),
                "gpu_busy_pct": sum(gpu) / len(gpu) if gpu else None}


def markdown(case: str, r: dict, top: int = 14) -> list[str]:
    gpu = f"; NVML GPU utilization {r['gpu_busy_pct']:.0f}%" if r.get("gpu_busy_pct") is not None else ""
    lines = [f"CPU by thread, {case}, over {r['window_s']:.1f} s of the measured run{gpu} (cores; process totals: "
             + ", ".join(f"{p['process']} {p['cores']:.2f}" for p in r["processes"][:6]) + "):", "",
             "| process | thread | cores |", "|---|---|--:|"]
    lines += [f"| {t['process']} | {t['thread']} | {t['cores']:.2f} |" for t in r["threads"][:top]]
    return lines + [""]

