"""Python threads named in the OS too, so that `top -H`, `/proc/PID/task/*/comm` and profilers show
which of a process's threads burns a core (benchmarks/cpu_threads.py reads them). Python 3.14 does
this itself; 3.11-3.13 leave every thread with the name of the thread that started it."""

from __future__ import annotations

import ctypes
import sys
import threading

_PR_SET_NAME = 15  # prctl(2): names the calling thread
_COMM_LEN = 15  # the kernel keeps 15 bytes of a thread's name
_PREFIX = "rtdiff-"  # every thread of ours has it; the OS name drops it to fit in 15 bytes


def set_native_name(name: str | None = None) -> None:
    """Names the calling thread in the OS after `name` (default: its Python name). Linux only; a
    no-op elsewhere or where libc refuses: a name is a diagnostic, never a reason to fail."""
    if not sys.platform.startswith("linux") or sys.version_info >= (3, 14):
        return
    name = name or threading.current_thread().name
    if name.startswith(_PREFIX):
        name = name[len(_PREFIX):]
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_NAME, name.encode()[:_COMM_LEN], 0, 0, 0)
    except (OSError, AttributeError):
        pass
