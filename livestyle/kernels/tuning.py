"""The autotuning shared by the Triton kernels: a short list of configs per kernel, tried on the GPU.

Each kernel lists a few configs (block sizes, warps) and the arguments whose values change
which is fastest (`key`); Triton times every config once per new key (and per input
dtype) and keeps the best. In Triton's interpreter timing means nothing and each config
would rerun the kernel, so there only the first config is kept: the tests run each
kernel once per call.
"""

from __future__ import annotations

import triton

# @triton.jit reads TRITON_INTERPRET when it decorates; the kernels in this package are
# made when they are first imported, so this is the mode they run in.
INTERPRETED = bool(triton.knobs.runtime.interpret)


def autotune(configs: list[triton.Config], key: list[str]):
    """triton.autotune over `configs` keyed on `key`; the first config alone under the interpreter."""
    return triton.autotune(configs=configs[:1] if INTERPRETED else configs, key=key)


def config(num_warps: int = 4, num_stages: int = 2, **meta) -> triton.Config:
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)
