"""LoRA: fuse low-rank weight deltas into the U-Net and text encoder, once, at load.

For each targeted Linear or Conv2d (Hu et al. 2021, arXiv:2106.09685):

    W <- W + scale * (alpha / rank) * up @ down

down: (rank, in) or (rank, in, kh, kw); up: (out, rank) or (out, rank, 1, 1). The
product is done in fp32 and the result cast back to the weight's dtype. Fused
weights cost nothing per frame; the price is that a LoRA cannot be switched off
without reloading.

Key formats read, for SD 1.x/2.x and SDXL:

  A1111 / kohya-ss   lora_unet_<path>.lora_down.weight, .lora_up.weight, .alpha
                     lora_te_<path>...   <path> is the diffusers / transformers module
                     path with "." written "_", e.g. lora_unet_down_blocks_0_attentions_0_proj_in,
                     lora_te_text_model_encoder_layers_0_mlp_fc1. U-Net paths may also be
                     original-SD (CompVis) module paths, e.g. lora_unet_input_blocks_1_1_proj_in,
                     lora_unet_output_blocks_3_0_in_layers_2, lora_unet_time_embed_0 (some
                     trainers and LyCORIS write those); they are resolved through
                     convert_unet.original_module_names, which needs a livestyle UNet (its
                     config numbers the blocks).
  kohya SDXL         lora_unet_<original-SD path> (input_blocks_4_1_..., label_emb_0_0 for the
                     added embedding), lora_te1_<path> (CLIP ViT-L, the first text encoder) and
                     lora_te2_<path> (OpenCLIP ViT-bigG in CLIPTextModelWithProjection names,
                     the second), as kohya-ss sd-scripts writes them for SDXL.
  PEFT (diffusers)   unet.<path>.lora_A.weight, .lora_B.weight (optional .alpha), and
                     text_encoder.<path>..., text_encoder_2.<path>... (SDXL); also bare <path>
                     and base_model.model.<path>.
  diffusers, older   unet.<path>.lora.down.weight / .lora.up.weight;
                     unet.<attn>.processor.to_q_lora.down.weight (attention processors);
                     text_encoder.<path>.lora_linear_layer.down.weight.

No alpha means alpha = rank (multiplier 1), as diffusers assumes. Text encoder
paths match with or without the leading "text_model." (transformers 4 and our
TextEncoder have it, transformers 5 does not). Anything that cannot be fused
exactly raises CheckpointError naming a few keys; nothing is fused unless the
whole LoRA fits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from livestyle.errors import CheckpointError
from livestyle.models.convert_unet import original_module_names
from livestyle.models.unet import UNet

# (down suffix, up suffix, style). No suffix is a tail of another, so the first match is the only one.
_PAIR_SUFFIXES = (
    (".lora_down.weight", ".lora_up.weight", "kohya"),
    (".lora_A.weight", ".lora_B.weight", "peft"),
    (".lora.down.weight", ".lora.up.weight", "diffusers"),
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight", "diffusers"),
    ("_lora.down.weight", "_lora.up.weight", "processor"),  # attn1.processor.to_q_lora.down.weight
)

# Key fragments of LoRA variants that are not a plain up @ down product.
_VARIANTS = (
    ("dora_scale", "DoRA"),
    ("lora_magnitude_vector", "DoRA"),
    ("hada_w", "LoHa (LyCORIS)"),
    ("lokr_w", "LoKr (LyCORIS)"),
    ("lora_mid", "LoCon with a Tucker mid weight (LyCORIS)"),
    ("lora_B.bias", "LoRA with biases"),
    ("lora_up.bias", "LoRA with biases"),
)
_DIFF_SUFFIXES = (".diff", ".diff_b")  # LyCORIS full weight differences

# Original-SD U-Net module names (kohya for SDXL, some other trainers and LyCORIS for SD 1.x).
# None of them starts like a diffusers name (conv_in, time_embedding, down_blocks, ...).
_ORIGINAL_UNET = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_",
                  "lora_unet_time_embed_", "lora_unet_out_")

# Old diffusers attention-processor names -> the layer they adapt.
_PROCESSOR_UNET = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_PROCESSOR_TEXT = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def _few(keys, n: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


@dataclass(frozen=True)
class _Update:
    """One weight to change: weight += scale * multiplier * up @ down."""

    key: str  # the LoRA's name for it, for messages
    weight: nn.Parameter
    down: Tensor
    up: Tensor
    multiplier: float  # alpha / rank


class _Layers:
    """The Linear / Conv2d layers of one model, by dotted path and by kohya's underscore spelling.

    `aliases` (other path -> path, e.g. original-SD names of U-Net modules) add more
    underscore spellings for the same layers.
    """

    def __init__(self, model: nn.Module, strip: str = "", aliases: dict[str, str] | None = None):
        self.by_path: dict[str, nn.Module] = {}
        self.by_underscore: dict[str, str | None] = {}  # None: two paths spell the same
        for name, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                path = name.removeprefix(strip)
                self.by_path[path] = module
                self._spell(path, path)
        for alias, path in (aliases or {}).items():
            if path in self.by_path:  # aliases of norms and the like are no LoRA targets
                self._spell(alias, path)

    def _spell(self, name: str, path: str) -> None:
        flat = name.replace(".", "_")
        self.by_underscore[flat] = None if flat in self.by_underscore else path


def _group(lora: dict[str, Tensor]) -> dict[str, dict]:
    """{stem: {"down", "up", "alpha", "style"}}; raises on keys of no known format."""
    groups: dict[str, dict] = {}
    unknown = []
    for key, value in lora.items():
        for down_suffix, up_suffix, style in _PAIR_SUFFIXES:
            part = "down" if key.endswith(down_suffix) else "up" if key.endswith(up_suffix) else None
            if part:
                stem = key[: -len(down_suffix if part == "down" else up_suffix)]
                group = groups.setdefault(stem, {})
                if group.setdefault("style", style) != style:
                    raise CheckpointError(f"LoRA has {stem} in two key formats ({group['style']} and {style})")
                group[part] = value
                break
        else:
            if key.endswith(".alpha"):
                groups.setdefault(key[: -len(".alpha")], {})["alpha"] = value
            else:
                unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"LoRA has keys of no known format: {_few(unknown)}; expected kohya "
            "lora_unet_*/lora_te_* .lora_down/.lora_up/.alpha or diffusers/PEFT unet.*/text_encoder.* .lora_A/.lora_B"
        )
    incomplete = [stem for stem, g in groups.items() if "down" not in g or "up" not in g]
    if incomplete:
        raise CheckpointError(f"LoRA has layers without both down and up weights: {_few(incomplete)}")
    return groups


def _check_format(keys, original_names: bool) -> None:
    """Refuse whole families of LoRAs we do not fuse, with the reason.

    original_names: whether original-SD U-Net names can be resolved (a livestyle UNet was given).
    """
    variants = [*_VARIANTS, *((suffix, "full weight differences (LyCORIS)") for suffix in _DIFF_SUFFIXES)]
    for marker, variant in variants:
        hits = [k for k in keys if (k.endswith(marker) if marker in _DIFF_SUFFIXES else marker in k)]
        if hits:
            raise CheckpointError(f"this LoRA is {variant} ({_few(hits, 1)}); only plain LoRA/LoCon is supported")
    original = [k for k in keys if k.startswith(_ORIGINAL_UNET)]
    if original and not original_names:
        raise CheckpointError(
            f"LoRA uses original SD block names (lora_unet_input_blocks_…, e.g. {_few(original, 1)}), "
            "which only a livestyle UNet can resolve (its config numbers the blocks), not this U-Net"
        )


_SECOND = "second text encoder"  # SDXL's OpenCLIP ViT-bigG


def _resolve(stem: str, style: str, unet: _Layers | None, text: _Layers | None,
             text_2: _Layers | None) -> tuple[str, nn.Module] | None:
    """The (component, layer) a LoRA stem adapts, or None if there is no such layer."""
    if stem.startswith("lora_unet_"):
        return _by_underscore(stem, "U-Net", unet, stem.removeprefix("lora_unet_"))
    for prefix, component, layers in (("lora_te_", "text encoder", text), ("lora_te1_", "text encoder", text),
                                      ("lora_te2_", _SECOND, text_2)):
        if stem.startswith(prefix):
            return _by_underscore(stem, component, layers, stem.removeprefix(prefix).removeprefix("text_model_"))

    component, path = None, stem.removeprefix("base_model.model.")
    if path.startswith("unet."):
        component, path = "U-Net", path.removeprefix("unet.")
    elif path.startswith("text_encoder."):
        component, path = "text encoder", path.removeprefix("text_encoder.")
    elif path.startswith("text_encoder_2."):
        component, path = _SECOND, path.removeprefix("text_encoder_2.")
    path = path.removeprefix("text_model.") if component != "U-Net" else path
    if style == "processor":  # attn1.processor.to_q -> attn1.to_q (U-Net) / self_attn.q_proj (text)
        parent, _, name = path.replace(".processor.", ".").rpartition(".")
        in_text = component in ("text encoder", _SECOND) or (component is None and "self_attn" in parent)
        names = _PROCESSOR_TEXT if in_text else _PROCESSOR_UNET
        if name not in names:
            return None
        path = f"{parent}.{names[name]}"

    candidates = [("U-Net", unet), ("text encoder", text), (_SECOND, text_2)]
    if component is not None:
        candidates = [c for c in candidates if c[0] == component]
    if component is None:  # a bare path names no SDXL second encoder
        candidates = candidates[:2]
    for name, layers in candidates:
        if layers is None and component is not None:
            raise CheckpointError(f"LoRA {stem} targets the {name}, but no {name} was given")
        if layers is not None and path in layers.by_path:
            return name, layers.by_path[path]
    return None


def _by_underscore(stem: str, component: str, layers: _Layers | None, flat: str) -> tuple[str, nn.Module] | None:
    """kohya's lora_unet_down_blocks_0_... -> the layer whose dotted path spells the same with "_"."""
    if layers is None:
        raise CheckpointError(f"LoRA {stem} targets the {component}, but no {component} was given")
    if flat not in layers.by_underscore:
        return None
    path = layers.by_underscore[flat]
    if path is None:
        raise CheckpointError(f"LoRA {stem} could mean two layers of the {component}")
    return component, layers.by_path[path]


def _delta_shape(down: Tensor, up: Tensor) -> tuple[int, ...] | None:
    """Shape of up @ down, (out, in) or (out, in, kh, kw); None if the pair does not compose."""
    if up.ndim not in (2, 4) or down.ndim not in (2, 4) or up.shape[1] != down.shape[0]:
        return None
    if up.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
        return None  # the up projection of a LoCon is always 1x1
    if down.ndim == 4:
        return (up.shape[0], down.shape[1], *down.shape[2:])
    return (up.shape[0], down.shape[1])


def _squeeze_1x1(shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape[:2] if len(shape) == 4 and shape[2:] == (1, 1) else shape


def _fits(delta: tuple[int, ...], weight: tuple[int, ...]) -> bool:
    """A 1x1 conv and a linear layer of the same (out, in) take each other's LoRAs
    (SD 1.x's proj_in is a 1x1 conv, SD 2.x's a linear)."""
    return _squeeze_1x1(tuple(delta)) == _squeeze_1x1(tuple(weight))


def _plan(lora: dict[str, Tensor], unet: nn.Module | None, text_encoder: nn.Module | None,
          text_encoder_2: nn.Module | None = None) -> list[_Update]:
    """Resolve and check every entry of one LoRA, changing nothing."""
    if unet is None and text_encoder is None and text_encoder_2 is None:
        raise ValueError("fuse_lora needs a unet or a text encoder to fuse into")
    if not lora:
        raise CheckpointError("LoRA has no tensors")
    # Only our UNet carries the UNetConfig that numbers the original blocks
    # (diffusers' UNet2DConditionModel has a `.config` too, of another kind).
    ours = isinstance(unet, UNet)
    _check_format(lora.keys(), original_names=ours)
    aliases = original_module_names(unet.config) if ours else None
    unet_layers = _Layers(unet, aliases=aliases) if unet is not None else None
    text_layers = _Layers(text_encoder, strip="text_model.") if text_encoder is not None else None
    text_2_layers = _Layers(text_encoder_2, strip="text_model.") if text_encoder_2 is not None else None

    updates, missing, targeted = [], [], {}
    for stem, group in _group(lora).items():
        found = _resolve(stem, group["style"], unet_layers, text_layers, text_2_layers)
        if found is None:
            missing.append(stem)
            continue
        component, layer = found
        down, up = group["down"], group["up"]
        delta = _delta_shape(down, up)
        if delta is None or not _fits(delta, tuple(layer.weight.shape)):
            raise CheckpointError(
                f"LoRA {stem} does not fit the {component}: down {tuple(down.shape)}, up {tuple(up.shape)} "
                f"for a weight of shape {tuple(layer.weight.shape)}"
            )
        if id(layer) in targeted:
            raise CheckpointError(f"LoRA targets one layer twice: {targeted[id(layer)]} and {stem}")
        targeted[id(layer)] = stem
        rank = down.shape[0]
        alpha = float(group["alpha"]) if "alpha" in group else float(rank)
        updates.append(_Update(stem, layer.weight, down, up, alpha / rank))
    if missing:
        raise CheckpointError(f"LoRA layers match nothing in the model: {_few(missing)}")
    return updates


@torch.no_grad()
def _apply(update: _Update, scale: float) -> None:
    w = update.weight
    down = update.down.to(device=w.device, dtype=torch.float32)
    up = update.up.to(device=w.device, dtype=torch.float32)
    if down.ndim == 4 and tuple(down.shape[2:]) != (1, 1):
        # A kxk conv followed by a 1x1 conv is one kxk conv: sum over the rank.
        delta = torch.einsum("or,rihw->oihw", up.flatten(1), down)
    else:
        delta = up.flatten(1) @ down.flatten(1)  # (out, r) @ (r, in) -> (out, in)
    delta = delta * (update.multiplier * scale)
    w.copy_((w.float() + delta.reshape(w.shape)).to(w.dtype))


def fuse_lora(
    lora: dict[str, Tensor],
    scale: float = 1.0,
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    text_encoder_2: nn.Module | None = None,
) -> int:
    """Fuse one LoRA, in any of the module docstring's key formats, into the models in place.

    lora: the LoRA file's tensors (e.g. from safetensors). scale: the LoRA strength
    (1.0 = as trained; A1111's <lora:name:scale>). unet: a module with diffusers U-Net
    parameter names (a livestyle UNet also takes original-SD names); text_encoder: one
    with CLIPTextModel names; text_encoder_2: SDXL's second (CLIPTextModelWithProjection
    names), for lora_te2_* and text_encoder_2.* keys. A LoRA with weights
    for a model that is not given is an error. Returns the number of weights changed.
    Raises CheckpointError before changing anything if any entry does not fit.
    """
    return fuse_loras([(lora, scale)], unet, text_encoder, text_encoder_2)


def fuse_loras(
    loras: list[tuple[dict[str, Tensor], float]],
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    text_encoder_2: nn.Module | None = None,
) -> int:
    """Fuse several (lora, scale) pairs; all are checked, for every model given, before any
    is fused.

    Deltas add, so the order does not matter (up to rounding). Returns the total
    number of weight updates (a layer two LoRAs target counts twice).
    """
    plans = []
    for i, (lora, scale) in enumerate(loras):
        try:
            plans.append((_plan(lora, unet, text_encoder, text_encoder_2), float(scale)))
        except CheckpointError as e:
            if len(loras) == 1:
                raise
            raise CheckpointError(f"LoRA {i + 1} of {len(loras)}: {e}") from None
    for updates, scale in plans:
        for update in updates:
            _apply(update, scale)
    return sum(len(updates) for updates, _ in plans)
