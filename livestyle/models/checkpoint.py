"""Reading weight files: `.safetensors` only, checked before use, and told apart by keys.

Everything that opens a weight file goes through here, so that the rules hold in one
place:

- Only safetensors are read. A pickle checkpoint (`.ckpt`, `.pt`, `.pth`, `.bin`) can
  run code when loaded; it is refused with the command that converts it.
- A file is checked against its own header before any tensor is read: a truncated
  download is reported as truncated, not as a cryptic deserialisation error.
- `describe()` names what a set of keys looks like (an SD 1.x single file, an SDXL
  U-Net, a LoRA, a TAESD decoder...), for error messages and `livestyle inspect`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from livestyle.errors import CheckpointError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit
_DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
    "I16": 2, "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1,
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header lists it, without its data."""

    dtype: str
    shape: tuple[int, ...]


def convert_hint(path: Path) -> str:
    """The one-line refusal for a pickle checkpoint, with the command that converts it."""
    out = path.with_suffix(".safetensors").name
    return (
        f"{path}: this is a pickle checkpoint; livestyle reads only .safetensors, because loading "
        f"a pickle can run arbitrary code. Convert it once with: python -c \"import torch, "
        f"safetensors.torch as s; d = torch.load('{path.name}', map_location='cpu', weights_only=True); "
        f"s.save_file({{k: v.contiguous() for k, v in d.get('state_dict', d).items() "
        f"if isinstance(v, torch.Tensor)}}, '{out}')\""
    )


def _refuse_non_safetensors(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, expected a .safetensors file")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(convert_hint(path))
    with open(path, "rb") as f:
        head = f.read(9)
    # Whatever the name says: a safetensors header (JSON) starts at byte 8; torch.save
    # writes a zip archive ("PK") and older tools a raw pickle stream (PROTO opcode 0x80).
    if head[8:9] != b"{" and (head[:2] == b"PK" or head[:1] == b"\x80"):
        raise CheckpointError(convert_hint(path))


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """The tensors a safetensors file holds (name -> dtype, shape), read from its header.

    Also checks that the file is as long as its header says, so a truncated file is
    caught here. Raises CheckpointError for anything that is not a whole safetensors file.
    """
    path = Path(path)
    _refuse_non_safetensors(path)
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes)")
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER_BYTES or f.read(1) != b"{":
            raise CheckpointError(f"{path}: not a safetensors file (no safetensors header at its start)")
        if 8 + n > size:
            raise CheckpointError(f"{path}: truncated safetensors file: its header alone is {n} bytes, "
                                  f"the file has {size}")
        f.seek(8)
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: not a safetensors file (unreadable header: {e.msg if hasattr(e, 'msg') else e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a table)")
    header.pop("__metadata__", None)
    infos: dict[str, TensorInfo] = {}
    end = 0
    for name, entry in header.items():
        shown = name if len(name) <= 80 else f"{name[:80]}..."
        try:
            dtype, shape, (begin, stop) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: not a safetensors file (bad header entry for {shown!r})") from None
        # JSON can hold anything here: offsets and sizes are checked as whole numbers before any arithmetic.
        if not all(_whole(v) for v in (begin, stop, *shape)) or not isinstance(dtype, str) or begin > stop:
            raise CheckpointError(f"{path}: corrupt safetensors header ({shown!r}: dtype, shape and data_offsets "
                                  "must be a string and non-negative integers)")
        expected = _DTYPE_BYTES.get(dtype, 0) * _numel(shape)
        if dtype in _DTYPE_BYTES and stop - begin != expected:
            raise CheckpointError(f"{path}: corrupt safetensors header ({shown!r} has the wrong byte size)")
        infos[name] = TensorInfo(dtype, shape)
        end = max(end, stop)
    data = size - 8 - n
    if data < end:
        raise CheckpointError(
            f"{path}: truncated safetensors file: the header promises {end} bytes of tensor data, "
            f"the file has {data} (an interrupted download?)"
        )
    return infos


def _whole(value) -> bool:
    return type(value) is int and value >= 0


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for d in shape:
        count *= d
    return count


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, on the CPU in their stored dtype."""
    path = Path(path)
    read_header(path)
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error type from Rust; name it and go
        raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# -- What a set of keys looks like -------------------------------------------------------

_KINDS = (
    # (kind, test, description); the first that matches wins, most specific first.
    ("unsupported", lambda k: any(".joint_blocks." in x or x.startswith("joint_blocks.") for x in k),
     "an SD3 (MMDiT) checkpoint; only SD 1.x/2.x U-Nets are supported"),
    ("unsupported", lambda k: any("double_blocks." in x for x in k),
     "a FLUX checkpoint; only SD 1.x/2.x U-Nets are supported"),
    ("lora", lambda k: any(x.startswith(("lora_unet_", "lora_te")) or ".lora_A." in x or ".lora.down." in x
                           or "_lora.down." in x or ".lora_down." in x for x in k),
     "a LoRA, not a model checkpoint"),
    # ControlNets before U-Nets: their encoder half has a U-Net's key names.
    ("controlnet", lambda k: any(x.startswith(("control_model.input_hint_block.", "input_hint_block.")) for x in k)
     and any("label_emb.0.0.weight" in x for x in k), "an SDXL ControlNet (original layout)"),
    ("controlnet", lambda k: any(x.startswith(("control_model.input_hint_block.", "input_hint_block.")) for x in k),
     "an SD 1.x/2.x ControlNet (original layout)"),
    ("controlnet", lambda k: "controlnet_cond_embedding.conv_in.weight" in k and "add_embedding.linear_1.weight" in k,
     "an SDXL ControlNet (diffusers layout)"),
    ("controlnet", lambda k: "controlnet_cond_embedding.conv_in.weight" in k,
     "an SD 1.x/2.x ControlNet (diffusers layout)"),
    ("pipeline", lambda k: "model.diffusion_model.label_emb.0.0.weight" in k,
     "an SDXL single-file checkpoint (original layout)"),
    ("pipeline", lambda k: any(x.startswith("conditioner.embedders.") for x in k)
     and any(x.startswith("model.diffusion_model.") for x in k), "an SDXL single-file checkpoint (original layout)"),
    ("pipeline", lambda k: any(x.startswith("model.diffusion_model.") for x in k),
     "an SD single-file checkpoint (original layout)"),
    ("text", lambda k: any(x.startswith("conditioner.embedders.") for x in k),
     "SDXL's text encoders (conditioner.embedders.*) without a U-Net"),
    ("unet", lambda k: "label_emb.0.0.weight" in k, "an SDXL U-Net in the original SD layout"),
    ("unet", lambda k: "input_blocks.0.0.weight" in k, "a U-Net in the original SD layout"),
    ("unet", lambda k: "add_embedding.linear_1.weight" in k, "an SDXL U-Net in the diffusers layout"),
    ("unet", lambda k: "time_embedding.linear_1.weight" in k, "a U-Net in the diffusers layout"),
    ("autoencoder", lambda k: "encoder.down.0.block.0.conv1.weight" in k, "a KL VAE in the original SD layout"),
    ("autoencoder", lambda k: "encoder.down_blocks.0.resnets.0.conv1.weight" in k, "a KL VAE in the diffusers layout"),
    ("autoencoder", lambda k: any(x.startswith("encoder.layers.") for x in k),
     "a tiny autoencoder (diffusers AutoencoderTiny)"),
    ("autoencoder", lambda k: all(x.split(".", 1)[0].isdigit() for x in k)
     and any(x.endswith(".conv.0.weight") for x in k), "a TAESD-family encoder or decoder"),
    ("text", lambda k: any(x.startswith("text_model.") for x in k), "a CLIP text encoder (transformers layout)"),
)


def classify(keys) -> tuple[str, str]:
    """(kind, phrase) for a set of state-dict keys.

    kind is one of "unsupported", "lora", "controlnet", "pipeline", "unet", "autoencoder",
    "text", "unknown"; the phrase says what the keys look like, for messages.
    """
    keys = set(keys)
    for kind, test, what in _KINDS:
        if test(keys):
            return kind, what
    sample = ", ".join(sorted(keys)[:3]) or "no tensors"
    return "unknown", f"an unrecognised set of {len(keys)} tensors (e.g. {sample})"


def describe(keys) -> str:
    """A short phrase saying what a set of state-dict keys looks like."""
    return classify(keys)[1]


def unsupported(keys) -> str | None:
    """The reason a checkpoint cannot be used at all, or None."""
    kind, what = classify(keys)
    return what if kind == "unsupported" else None


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], source: Path | str,
              assign: bool = False) -> None:
    """Load `state` into `module` strictly; on a mismatch, name a few keys and what the file is.

    assign: take the tensors themselves rather than copying into the module's own
    (for a module built on the meta device).
    """
    expected = set(module.state_dict().keys())
    missing = sorted(expected - state.keys())
    unexpected = sorted(state.keys() - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise CheckpointError(
            f"{source}: keys do not fit {type(module).__name__}: {'; '.join(parts)}; "
            f"the file looks like {describe(state.keys())}"
        )
    own = module.state_dict()
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(
                f"{source}: {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}"
            )
    module.load_state_dict(state, strict=True, assign=assign)
