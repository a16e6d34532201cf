"""Fused kernels behind one dispatch point: Triton on CUDA, the plain-torch reference elsewhere.

Each Triton kernel (group_norm_triton.py, layer_norm_triton.py, geglu_triton.py,
cached_attention_triton.py, frame_triton.py, propagate_triton.py, sampler_step_triton.py)
has a reference with the same signature in reference.py; the models and the engine call
the functions below, which pick one (unet.Attention hands cached_attention a
TemporalCache's ring buffers as stored, with the per-slot flags). KERNELS names them all.
The backend is chosen in one place:

- `set_backend("auto" | "triton" | "torch")`, or the environment variable
  `LIVESTYLE_KERNELS` (read once, at the first kernel call or `backend()`), or the
  CLI's `--kernels`. Default "auto": Triton for CUDA tensors, the reference for others.
- "triton" where Triton cannot run (not installed; a CPU tensor outside Triton's
  interpreter) raises LivestyleError; it never falls back silently.
- Under `TRITON_INTERPRET=1` (set before triton is imported) the Triton kernels run
  on CPU tensors in Triton's interpreter: that is how the CPU tests check them. "auto"
  still takes the reference for CPU tensors there.

Triton is imported only when a Triton kernel is first used, so the reference path
works (and imports fast) where Triton is not installed. Each kernel autotunes over a
short list of configs on the GPU (tuning.py; the first config alone in the interpreter).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys

import torch

from livestyle.errors import LivestyleError
from livestyle.kernels import reference

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "LIVESTYLE_KERNELS"

_backend: str | None = None  # None until set_backend() or the first use reads LIVESTYLE_KERNELS
KERNELS = ("group_norm", "layer_norm", "geglu", "cached_attention", "frame_in", "frame_out", "propagate",
           "sampler_step")  # the dispatched functions below, each with a Triton kernel and a reference
_triton_modules = None  # {kernel name: its Triton module}, imported at first use


def _checked(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise LivestyleError(f"{source}: unknown kernel backend {name!r} (choose {', '.join(BACKENDS)})")
    return name


def set_backend(name: str) -> None:
    """Choose the kernels for every later call: "auto", "triton" or "torch".

    "triton" is refused at once where Triton is not installed; whether it can run on a
    given tensor's device is checked at each call (and by `check(device)`).
    """
    global _backend
    _checked(name, "set_backend")
    if name == "triton":
        _require_triton()
    _backend = name


def backend() -> str:
    """The backend in force; on first use, LIVESTYLE_KERNELS's value (default "auto")."""
    global _backend
    if _backend is None:
        name = _checked(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", ENV_VAR)
        if name == "triton":
            _require_triton()
        _backend = name
    return _backend


@functools.cache  # a sys.path search when triton is not imported yet; asked at every CUDA kernel call
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreted() -> bool:
    """Whether Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1 when they were first loaded)."""
    if _triton_modules is not None:
        from livestyle.kernels import tuning  # imported with the kernels: the mode they were made for

        return tuning.INTERPRETED
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_problem(device: torch.device | str) -> str | None:
    """Why the Triton kernels cannot run on tensors of `device`, or None when they can."""
    device = torch.device(device)
    if not triton_installed():
        return "triton is not installed (pip install triton, Linux only)"
    if interpreted():
        return None  # the interpreter runs on host copies of any tensor
    if device.type != "cuda":
        return (f"the Triton kernels need CUDA tensors, not {device.type} ones "
                "(set TRITON_INTERPRET=1 to run them in Triton's interpreter on the CPU)")
    return None


def use(name: str | None, device: torch.device | str) -> None:
    """The CLI's `--kernels NAME` (None: LIVESTYLE_KERNELS or auto) for a run on `device`.

    Raises LivestyleError, naming --kernels, for an unknown name or Triton where it cannot run.
    """
    if name is not None:
        set_backend(_checked(name, "--kernels"))
    check(device, "--kernels triton" if name is not None else None)


def check(device: torch.device | str, asked_by: str | None = None) -> None:
    """Raise LivestyleError now if the backend in force asks for Triton and it cannot run on `device`.

    The CLI calls this once the device is known, so that `--kernels triton` on a machine
    that cannot run it fails at start rather than on every frame. `asked_by` names the
    setting in the message (default: LIVESTYLE_KERNELS=triton or set_backend, whichever set it).
    """
    if backend() == "triton" and (problem := triton_problem(device)) is not None:
        if asked_by is None:
            from_env = os.environ.get(ENV_VAR, "").strip().lower() == "triton"
            asked_by = f"{ENV_VAR}=triton" if from_env else "kernel backend triton"
        raise LivestyleError(f"{asked_by}: {problem}")


def describe(device: torch.device | str) -> str:
    """One line for `livestyle info`: which kernels run on `device` with the backend in force."""
    device = torch.device(device)
    name = backend()
    problem = triton_problem(device)
    where = "interpreter" if interpreted() else device.type
    if name == "torch":
        return f"torch reference (backend torch{'' if problem else '; Triton could run here'})"
    if problem is None and (name == "triton" or device.type == "cuda"):
        return f"Triton on {where} (backend {name}): {', '.join(KERNELS)}"
    if name == "triton":
        return f"none: backend triton, but {problem}"
    reason = "no CUDA" if triton_installed() else "triton is not installed"
    return f"torch reference ({reason}; backend auto)"


def _require_triton() -> None:
    if not triton_installed():
        raise LivestyleError("kernel backend triton: triton is not installed (pip install triton, Linux only)")


def _load_triton():
    global _triton_modules
    if _triton_modules is None:
        if interpreted() and "triton" in sys.modules:
            # triton.language's own jit functions (tl.sigmoid, ...) were made when triton was
            # imported; made for the GPU, they fail inside interpreted kernels.
            from triton.runtime.interpreter import InterpretedFunction

            if not isinstance(sys.modules["triton"].language.sigmoid, InterpretedFunction):
                raise LivestyleError("TRITON_INTERPRET=1 was set after triton was imported; "
                                     "set it before the process starts")
        # Not `from livestyle.kernels import group_norm`: that name is the dispatching function.
        from livestyle.kernels import (cached_attention_triton, frame_triton, geglu_triton, group_norm_triton,
                                       layer_norm_triton, propagate_triton, sampler_step_triton)

        _triton_modules = {"group_norm": group_norm_triton, "layer_norm": layer_norm_triton, "geglu": geglu_triton,
                           "cached_attention": cached_attention_triton, "frame_in": frame_triton,
                           "frame_out": frame_triton, "propagate": propagate_triton,
                           "sampler_step": sampler_step_triton}
    return _triton_modules


def _use_triton(x: torch.Tensor) -> bool:
    """True: run the Triton kernel on x; False: the reference. Raises where "triton" cannot run."""
    name = _backend or backend()
    if name == "torch":
        return False
    if name == "auto":
        return x.is_cuda and triton_installed()
    if (problem := triton_problem(x.device)) is not None:
        raise LivestyleError(f"kernel backend triton: {problem}")
    return True


# -- the dispatched kernels: same signatures as reference.py ---------------------------------

def group_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int,
               eps: float = 1e-5, activation: str | None = None, shift: torch.Tensor | None = None) -> torch.Tensor:
    """GroupNorm of (x + shift), then `activation`; see reference.group_norm."""
    if _use_triton(x):
        return _load_triton()["group_norm"].group_norm(x, weight, bias, groups, eps, activation, shift)
    return reference.group_norm(x, weight, bias, groups, eps, activation, shift)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dimension; see reference.layer_norm."""
    if _use_triton(x):
        return _load_triton()["layer_norm"].layer_norm(x, weight, bias, eps)
    return reference.layer_norm(x, weight, bias, eps)


def geglu(h: torch.Tensor) -> torch.Tensor:
    """(..., 2D) projection output -> (..., D) first half * gelu(second half); see reference.geglu."""
    if _use_triton(h):
        return _load_triton()["geglu"].geglu(h)
    return reference.geglu(h)


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bank_k: torch.Tensor, bank_v: torch.Tensor,
                     filled: torch.Tensor | None, heads: int) -> torch.Tensor:
    """The current frame's self-attention over itself and a TemporalCache ring; see reference.cached_attention."""
    if _use_triton(q):
        return _load_triton()["cached_attention"].cached_attention(q, k, v, bank_k, bank_v, filled, heads)
    return reference.cached_attention(q, k, v, bank_k, bank_v, filled, heads)


def frame_in(rgb: torch.Tensor, size: tuple[int, int], signed: bool, dtype: torch.dtype) -> torch.Tensor:
    """uint8 (B, H, W, 3) frames -> (B, 3, h, w) model input of `dtype`, resized; see reference.frame_in."""
    if _use_triton(rgb):
        return _load_triton()["frame_in"].frame_in(rgb, size, signed, dtype)
    return reference.frame_in(rgb, size, signed, dtype)


def frame_out(x: torch.Tensor, signed: bool) -> torch.Tensor:
    """(B, 3, h, w) model output -> uint8 (B, h, w, 3) frames, clamped and rounded; see reference.frame_out."""
    if _use_triton(x):
        return _load_triton()["frame_out"].frame_out(x, signed)
    return reference.frame_out(x, signed)


def propagate(current: torch.Tensor, previous: torch.Tensor, back: torch.Tensor, confidence: torch.Tensor,
              blend: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """`previous` warped along the small backward flow, blended into `current`; see reference.propagate.
    The Triton kernel samples bilinearly; mode "bicubic" runs the reference (grid_sample) on any device."""
    if mode == "bilinear" and _use_triton(current):
        return _load_triton()["propagate"].propagate(current, previous, back, confidence, blend)
    return reference.propagate(current, previous, back, confidence, blend, mode)


def sampler_step(x: torch.Tensor, out: torch.Tensor, noise: torch.Tensor | None,
                 coeffs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_next, denoised) of a few-step sampler, per-row coefficients (4, B); see reference.sampler_step."""
    if _use_triton(x):
        return _load_triton()["sampler_step"].sampler_step(x, out, noise, coeffs)
    return reference.sampler_step(x, out, noise, coeffs)
