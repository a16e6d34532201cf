"""How the CPU runs the model: thread count, how idle OpenMP threads wait, and how the
allocator keeps large buffers.

    threads.configure(n)     # the CLI, before torch is imported (run, serve, bench)
    threads.worker_started() # the engine's worker thread, first thing

Three findings on a 2-core CPU shared with other work (benchmarks/suite.py measures each):

- **Waiting threads must sleep.** libgomp's default is to spin (up to 300,000 checks) at
  every barrier. With another busy process on the machine, the spinning thread takes the
  core the working one needs, and the frame rate fell from its quiet figure to 0.8 fps.
  OMP_WAIT_POLICY=PASSIVE makes an idle thread sleep at once. OpenMP reads it when
  torch's libgomp is loaded, so it is set in the environment before `import torch`;
  KMP_BLOCKTIME=0 is the same for Intel's OpenMP.
- **One thread per core we may run on** (the default of `--threads`): with passive waits,
  a busy neighbour costs a share of each core instead of a whole team's progress.
- **Large buffers are kept.** oneDNN reorders each convolution's weight into its blocked
  layout on every call, into a fresh buffer (59 MB for a 1280->1280 3x3 convolution).
  glibc serves any block of more than 32 MB with mmap and unmaps it on free, so every
  call faulted its pages in again: 14,400 minor faults and ~25 ms of system time for that
  one convolution (28 ms in all; 13.5 ms without the faults), on any thread.
  `keep_allocations()` turns off glibc's mmap for large blocks and its trimming, so freed
  memory stays mapped and the next call reuses it: no faults. The cost: the process keeps
  its peak memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

from livestyle.errors import LivestyleError

MAX_THREADS = 256
# mallopt(3) parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: never give the heap's top back, the next frame asks for it again

# What the process was set to (configure), applied again on each engine worker thread.
_threads: int | None = None
_kept = False
_lock = threading.Lock()


def default_threads() -> int:
    """The number of CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def check_threads(n: int) -> int:
    """n if it is a usable thread count, else LivestyleError naming it."""
    if not 1 <= n <= MAX_THREADS:
        raise LivestyleError(f"threads {n}: must be 1 to {MAX_THREADS}")
    return n


def configure(threads: int | None = None) -> int:
    """Set the process's thread policy; returns the thread count. Call before `import torch`.

    Sets OMP_WAIT_POLICY=PASSIVE and KMP_BLOCKTIME=0 unless the environment already says
    otherwise (an explicit setting wins), torch's intra-op threads to `threads` (default:
    default_threads()), and keeps large allocations (keep_allocations). If torch's OpenMP
    was already loaded, the wait policy cannot change any more: the rest still applies.
    """
    global _threads
    n = check_threads(threads) if threads is not None else default_threads()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("KMP_BLOCKTIME", "0")
    import torch

    torch.set_num_threads(n)
    _threads = n
    keep_allocations()
    return n


def worker_started() -> None:
    """On a thread that will run the model (the engine's worker), before its first torch call.

    Applies configure()'s thread count to this thread's OpenMP team (OpenMP keeps the
    count per thread) and keeps large allocations, so an Engine gets the policy without
    the CLI too (tests, benchmarks, a library user)."""
    if _threads is not None:
        import torch

        torch.set_num_threads(_threads)
    keep_allocations()


def keep_allocations() -> bool:
    """Turn off glibc's mmap for large blocks and its heap trimming (see the module
    docstring); True if done, False where the C library is not glibc. Process-wide and
    idempotent."""
    global _kept
    with _lock:
        if _kept:
            return True
        libc = _glibc()
        if libc is None:
            return False
        # mallopt returns 1 on success. M_MMAP_MAX=0: large blocks come from the heap;
        # a block too large for a thread's heap still gets mmap (glibc's fallback).
        _kept = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
        return _kept


def allocations_kept() -> bool:
    return _kept


def describe() -> str:
    """One line for `livestyle info` and the benchmarks: threads, wait policy, allocator."""
    import torch

    wait = os.environ.get("OMP_WAIT_POLICY", "OpenMP default (spin, then sleep)")
    kept = "large blocks kept" if _kept else "glibc default (large blocks mmapped per call)"
    return f"{torch.get_num_threads()} threads of {default_threads()} CPUs, wait {wait}, allocator {kept}"


def _glibc():
    if not hasattr(os, "sched_getaffinity"):  # not Linux
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # only glibc has it (musl does not)
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return libc


def release_allocations() -> None:
    """Undo keep_allocations(), back to glibc's behaviour as it settles in a process that has
    run the model (its dynamic mmap threshold grows to at most 32 MB, trimming at twice
    that). For measuring the difference (benchmarks/suite.py), not for use."""
    global _kept
    with _lock:
        libc = _glibc()
        if libc is None:
            return
        libc.mallopt(M_MMAP_MAX, 65536)
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 64 << 20)
        _kept = False
