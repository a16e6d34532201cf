"""livestyle/threads.py: the thread count, the OpenMP wait policy, and large allocations kept."""

import os
import subprocess
import sys
import textwrap

import pytest

from livestyle import cli, threads
from livestyle.errors import LivestyleError

# One convolution called 5 times on a thread started afterwards: prints the minor page
# faults of the last 3 calls (the first two place the buffer: the freed block of the first is
# a few bytes short of the next aligned request). oneDNN reorders its 118 MB weight (SD's 2560->1280 3x3 ones)
# into a fresh buffer on every call: above glibc's largest mmap threshold (32 MB) and above
# a thread arena's heap (64 MB).
FAULTS = textwrap.dedent("""
    import resource, sys, threading
    from livestyle import threads
    if sys.argv[1] == "kept":
        assert threads.keep_allocations()
    import torch
    conv = torch.nn.Conv2d(2560, 1280, 3, padding=1).requires_grad_(False)
    x = torch.randn(1, 2560, 4, 4)
    out = []
    def work():
        for i in range(5):
            if i == 2:
                start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            conv(x)
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
    t = threading.Thread(target=work)
    t.start()
    t.join()
    print(out[0])
""")


def faults(mode: str) -> int:
    result = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, timeout=120,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(threads._glibc() is None, reason="mallopt is glibc's; this C library is not glibc")
def test_kept_allocations_are_not_faulted_in_again_on_a_worker_thread():
    pages = 3 * 2560 * 1280 * 9 * 4 // 4096  # the reordered weight, 3 calls
    assert faults("default") > pages // 2  # glibc maps the buffer afresh: its pages fault in on every call
    assert faults("kept") < pages // 100  # reused: (almost) no fault after the first call


def test_usable_cpus_is_the_affinity_mask(monkeypatch):
    assert threads.usable_cpus() == len(os.sched_getaffinity(0))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5})  # 3 of the machine's CPUs
    assert threads.usable_cpus() == 3


@pytest.mark.parametrize("cpus, default, small", [(1, 1, 1), (2, 2, 1), (3, 3, 1), (8, 8, 4)])
def test_default_threads_one_per_cpu_half_for_a_small_model(monkeypatch, cpus, default, small):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    assert threads.default_threads() == default
    assert threads.default_threads(small_model=True) == small


def test_configure_applies_the_default_and_an_explicit_count_wins(monkeypatch):
    import torch

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    before = torch.get_num_threads()
    try:
        assert threads.configure() == 4
        assert torch.get_num_threads() == 4
        assert threads.configure(small_model=True) == 2
        assert torch.get_num_threads() == 2
        assert threads.configure(3, small_model=True) == 3
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_configure_sets_passive_waits_and_the_thread_count(monkeypatch):
    import torch

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("KMP_BLOCKTIME", "200")  # an explicit setting wins
    before = torch.get_num_threads()
    try:
        assert threads.configure(1) == 1
        assert torch.get_num_threads() == 1
        assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
        assert os.environ["KMP_BLOCKTIME"] == "200"
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("n", [0, -1, threads.MAX_THREADS + 1])
def test_configure_refuses_a_bad_count(n):
    with pytest.raises(LivestyleError, match=f"threads {n}: must be 1 to {threads.MAX_THREADS}"):
        threads.configure(n)


@pytest.mark.parametrize("command", [["run", "test:"], ["serve"], ["bench"]])
@pytest.mark.parametrize("value, message", [("0", "threads 0: must be 1 to 256"),
                                            ("two", "threads 'two' is not a whole number")])
def test_threads_option_refuses_bad_values(command, value, message, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(command + ["--threads", value])
    assert exit.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
