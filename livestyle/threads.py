"""How the CPU runs the model: thread count, how idle OpenMP threads wait, and how the
allocator keeps large buffers.

    threads.configure(n, small_model=...)  # the CLI (run, serve, bench), before torch is imported
    threads.keep_allocations()  # Engine, before its worker thread starts (configure does it too)

Findings on the project's 2-core CPU (`livestyle bench` measures them in its sections
unet and contention; benchmarks/thread_policy.py compares thread policies, each in its
own process, quiet and beside one `while True: pass`):

- **Idle threads sleep at once.** libgomp's default is to spin at every barrier
  (300,000 spins, about 3 ms by its own estimate). With another busy process on the machine the spinning
  thread takes the core the working one needs: `livestyle run test:` fell to 0.8 fps
  (9.0 with one thread). OMP_WAIT_POLICY=PASSIVE makes an idle thread sleep at once.
  Even a short spin does not pay where anything else runs: on the shared machine (other
  jobs at load 1-9), two runs of 3 rounds, the demo model at 256x256 on two threads ran at
  13.9 and 14.9 fps passive, 2.4 and 22.7 spinning ~0.1 ms first (GOMP_SPINCOUNT=10000;
  3.2 and 3.0 beside one busy process) and 0.66 and 2.3 with OMP_WAIT_POLICY=ACTIVE.
  Only an otherwise idle machine runs faster spinning (the README's figures);
  OMP_WAIT_POLICY=ACTIVE in the environment is the user's choice there. OpenMP reads the
  policy when torch's libgomp is loaded, so it goes into the environment before
  `import torch`; KMP_BLOCKTIME=0 says the same to Intel's OpenMP.
- **One thread per CPU we may run on, half of them for a small model** (default_threads,
  the default of `--threads`). Against one thread per CPU, one thread on these 2 cores
  (medians of the per-round ratios, same runs): SD-Turbo's U-Net (oneDNN-packed, 256x256)
  ran at 1.00x and 1.12x without the extra busy process but 0.64x and 0.63x beside it: its
  convolutions keep a second core busy, and with passive waits a busy neighbour costs a
  share of each core, not the team's progress. The demo model (2.6 GFLOP a frame, many
  short operations: waking the second thread costs more than it gives) ran at 1.33x
  [1.18-1.41] quiet and 1.21x [0.78-1.23] beside the busy process, as on the idle machine
  (the README's table: one thread beat two, quiet and busy). Machines with more than 2
  CPUs are not measured.
- **Large buffers are kept.** oneDNN reorders each convolution's weight into its blocked
  layout on every call, into a fresh buffer: 59 MB for a 1280->1280 3x3 convolution,
  118 MB for SD's 2560->1280 ones. glibc serves a block above its mmap threshold (at most
  32 MB) with mmap and unmaps it on free, so each call faulted the pages in again (14,400
  minor faults for the 59 MB one). A thread other than the main one allocates from its
  own arena, whose heaps are at most 64 MB: there even with mmap off, every block above
  that (the six largest convolutions of SD's U-Net) was mapped afresh on each call. On the
  engine's worker thread an SD-Turbo U-Net call at 256x256 took ~306,000 faults (~0.7 s of
  system time), and so did the main thread of a fresh process. keep_allocations() makes every
  thread started afterwards use the main arena, turns off mmap for large blocks and never
  trims the heap: freed memory stays mapped, the next call reuses it, no faults. The cost:
  the process keeps its peak memory, and threads share one arena's lock (small blocks
  still come from each thread's own cache). livestyle.models.packed goes further: weights
  reordered once, no copy per call at all.
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
M_ARENA_MAX = -8
NEVER_TRIM = 2**31 - 1  # mallopt takes an int; the heap's top is never given back (the next frame wants it)

_kept = False
_lock = threading.Lock()


def usable_cpus() -> int:
    """The number of CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def default_threads(small_model: bool = False) -> int:
    """torch's thread count when none is given: one per usable CPU, or half of them (at
    least one) for a small model such as the demo model, whose short operations gain less
    from a second thread than waking it costs (see the module docstring)."""
    cpus = usable_cpus()
    return max(1, cpus // 2) if small_model else cpus


def configure(threads: int | None = None, small_model: bool = False) -> int:
    """Set the process's thread policy and return the thread count; call it before `import torch`.

    OMP_WAIT_POLICY=PASSIVE and KMP_BLOCKTIME=0 unless the environment says otherwise (an
    explicit setting wins); large allocations kept (keep_allocations); torch's intra-op
    threads: `threads`, default default_threads(small_model). If torch's OpenMP is already
    loaded its wait policy cannot change any more; the rest still applies.
    """
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise LivestyleError(f"threads {threads}: must be 1 to {MAX_THREADS}")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("KMP_BLOCKTIME", "0")
    keep_allocations()
    import torch

    n = threads or default_threads(small_model)
    torch.set_num_threads(n)  # other threads pick it up at their first parallel region (ATen)
    return n


def keep_allocations() -> bool:
    """Keep large allocations mapped (see the module docstring): the main arena for every
    thread started from now on (a thread keeps the arena it was given at its first
    allocation), no mmap for large blocks, no trimming. True if done, False where the C
    library is not glibc. Process-wide and idempotent."""
    global _kept
    with _lock:
        if not _kept:
            libc = _glibc()
            # mallopt returns 1 on success. A block larger than the heap can grow still gets
            # mmap (glibc's fallback), so nothing fails for want of it.
            _kept = libc is not None and all(libc.mallopt(p, v) == 1 for p, v in (
                (M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, NEVER_TRIM)))
        return _kept


def release_allocations() -> None:
    """Undo keep_allocations' mmap and trim settings, back to glibc's as they settle in a
    process that has run the model (its dynamic mmap threshold grows to at most 32 MB,
    trimming at twice that); threads already started keep their arena. For measuring the
    difference (benchmarks/suite.py)."""
    global _kept
    with _lock:
        libc = _glibc()
        if libc is not None:
            for p, v in ((M_MMAP_MAX, 65536), (M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 64 << 20)):
                libc.mallopt(p, v)
        _kept = False


def describe() -> str:
    """One line for the benchmarks: threads, wait policy, allocator."""
    import torch

    wait = os.environ.get("OMP_WAIT_POLICY", "OpenMP's default (spin, then sleep)")
    kept = "large blocks kept, one arena" if _kept else "glibc's default"
    return f"{torch.get_num_threads()} torch threads of {usable_cpus()} CPUs, OpenMP wait {wait}, allocator {kept}"


def _glibc():
    """The C library through ctypes if it is glibc (it has gnu_get_libc_version), else None."""
    if not hasattr(os, "sched_getaffinity"):  # not Linux
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return libc
