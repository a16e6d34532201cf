"""U-Net weights in the original single-file layout (CompVis / A1111 / Civitai) <-> diffusers names.

The original LDM U-Net numbers its modules by position:

    time_embed.{0,2}                        time_embedding.linear_{1,2}
    label_emb.0.{0,2}                       add_embedding.linear_{1,2}   (SDXL's added embedding)
    input_blocks.0.0                        conv_in
    input_blocks.{1 + l*(n+1) + j}.{0,1}    down_blocks.l.{resnets,attentions}.j   (n = layers_per_block)
    input_blocks.{1 + l*(n+1) + n}.0.op     down_blocks.l.downsamplers.0.conv
    middle_block.{0,1,2}                    mid_block.{resnets.0, attentions.0, resnets.1}
    output_blocks.{u*(n+1) + j}.{0,1}       up_blocks.u.{resnets,attentions}.j
    output_blocks.{u*(n+1) + n}.{1|2}.conv  up_blocks.u.upsamplers.0.conv  (2 when the level has attention)
    out.{0,2}                               conv_norm_out, conv_out

Inside a resnet the layer names differ (in_layers.0 = norm1, ...); inside a
transformer they are the same. Keys here come without the `model.diffusion_model.`
prefix of a full checkpoint; proj_in/proj_out weights keep their stored shapes
(4-D conv for SD 1.x, 2-D linear for SD 2.x and SDXL), matching `use_linear_projection`.
This is the inverse of diffusers' own `convert_ldm_unet_checkpoint` (single_file_utils.py),
written as one table from the config instead of string replacements; the tests check the
two agree.

SD 1.x, SD 2.x and SDXL are told apart by shapes alone: SDXL has `label_emb` (the added
embedding, 2816 inputs) and a 2048-d context; SD 2.x a 1024-d context, SD 1.x 768.
Per-level transformer depth is counted from the blocks (SDXL: 1, 2, 10).

LCM's guidance embedding (`time_embedding.cond_proj`, configs with time_cond_proj_dim)
has no name in the original layout: LCM checkpoints were trained and published in
the diffusers layout, and diffusers' own single-file loader maps no such key. Such
U-Nets load from the diffusers layout only.
"""

import torch

from livestyle.errors import CheckpointError
from livestyle.models.unet import UNet, UNetConfig

_RESNET_NAMES = {  # diffusers -> original, inside a resnet
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}

SDXL_TIME_EMBED_DIM = 256  # width of each time id's sinusoidal embedding; not stored in the weights
_LCM = ("the original U-Net layout has no name for LCM's guidance embedding (time_embedding.cond_proj, "
        "time_cond_proj_dim); load LCM U-Nets from the diffusers layout")


def _few(keys, n=3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _module_map(config: UNetConfig) -> dict[str, str]:
    """diffusers module prefix -> original module prefix (some entries name modules this config lacks)."""
    levels, n = len(config.block_out_channels), config.layers_per_block
    m = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
         "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
         "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
         "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
         "mid_block.resnets.1": "middle_block.2"}
    for level in range(levels):
        first = 1 + level * (n + 1)
        for j in range(n):
            m[f"down_blocks.{level}.resnets.{j}"] = f"input_blocks.{first + j}.0"
            m[f"down_blocks.{level}.attentions.{j}"] = f"input_blocks.{first + j}.1"
        m[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{first + n}.0.op"
    for u in range(levels):
        first = u * (n + 1)
        for j in range(n + 1):
            m[f"up_blocks.{u}.resnets.{j}"] = f"output_blocks.{first + j}.0"
            m[f"up_blocks.{u}.attentions.{j}"] = f"output_blocks.{first + j}.1"
        upsample = 2 if config.attention_levels[levels - 1 - u] else 1
        m[f"up_blocks.{u}.upsamplers.0.conv"] = f"output_blocks.{first + n}.{upsample}.conv"
    return m


def _expected_shapes(config: UNetConfig, cls=UNet) -> dict[str, tuple[int, ...]]:
    """diffusers key -> shape of every weight of `cls(config)`, from a model on the meta device (no memory)."""
    with torch.device("meta"):
        model = cls(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def rename_keys(keys, modules: dict[str, str]) -> dict[str, str]:
    """diffusers key -> original key, renaming each key's longest module prefix found in
    `modules` (diffusers -> original module paths), and a resnet's own layer names."""
    renamed = {}
    for key in keys:
        parts = key.split(".")
        cut = next(c for c in range(len(parts) - 1, 0, -1) if ".".join(parts[:c]) in modules)
        prefix, rest = ".".join(parts[:cut]), parts[cut:]
        if ".resnets." in prefix:
            rest = [_RESNET_NAMES[rest[0]], *rest[1:]]
        renamed[key] = ".".join([modules[prefix], *rest])
    return renamed


def _key_map(config: UNetConfig) -> dict[str, str]:
    """diffusers key -> original key, for every weight of a U-Net with this config
    except the one without an original name (time_embedding.cond_proj)."""
    keys = [k for k in _expected_shapes(config) if not k.startswith("time_embedding.cond_proj.")]
    return rename_keys(keys, _module_map(config))


def original_module_names(config: UNetConfig) -> dict[str, str]:
    """Original module path -> diffusers module path, for every module with weights.

    E.g. "input_blocks.1.1.transformer_blocks.0.attn1.to_q" ->
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "time_embed.0" ->
    "time_embedding.linear_1", "output_blocks.3.0.in_layers.2" -> "up_blocks.1.resnets.0.conv1"
    (SD 1.5). Paths have no `model.diffusion_model.` prefix. Only modules that this
    config has are listed (time_embedding.cond_proj, which has no original name, is not).
    """
    modules = {}
    for diffusers_key, original_key in _key_map(config).items():
        modules[original_key.rpartition(".")[0]] = diffusers_key.rpartition(".")[0]  # drop .weight / .bias
    return modules


def unet_config_from_original(shapes: dict[str, tuple[int, ...]],
                              num_heads: tuple[int, ...] | None = None) -> UNetConfig:
    """The UNetConfig of an original-layout U-Net, read from its key -> shape map.

    Keys come without the `model.diffusion_model.` prefix. Head counts are not stored
    in the weights: SD 1.x (context 768) uses 8 heads, SD 2.x (context 1024) and SDXL
    (2048) 64-channel heads; `num_heads` (one per level) overrides that for other models.
    Groups (32), norm eps, the timestep embedding and SDXL's 256-wide time-id embedding
    are SD's fixed values.
    """
    if "conv_in.weight" in shapes:
        raise CheckpointError("U-Net weights are in the diffusers layout (conv_in.weight), not the original one")
    if any("cond_proj" in k for k in shapes):
        raise CheckpointError(f"{_LCM} (found {_few(k for k in shapes if 'cond_proj' in k)})")
    needed = ["input_blocks.0.0.weight", "out.2.weight", "time_embed.0.weight"]
    if any(k not in shapes for k in needed):
        hint = " (strip the 'model.diffusion_model.' prefix first)" if any(
            k.startswith("model.diffusion_model.") for k in shapes) else ""
        raise CheckpointError(f"not an SD U-Net in the original layout: no {_few(k for k in needed if k not in shapes)}"
                              f"; found {_few(shapes)}{hint}")
    fields = encoder_config_from_original(shapes, num_heads)
    try:
        return UNetConfig(out_channels=shapes["out.2.weight"][0], **fields)
    except ValueError as e:  # e.g. a num_heads override that does not fit the channels
        raise CheckpointError(str(e)) from None


def encoder_config_from_original(shapes: dict[str, tuple[int, ...]],
                                 num_heads: tuple[int, ...] | None = None) -> dict:
    """UNetConfig fields (all but out_channels) read from the encoder half of an original-layout
    U-Net or ControlNet: time_embed, label_emb, input_blocks and middle_block, which both share."""
    label = [k for k in shapes if k.startswith("label_emb")]
    if label and "label_emb.0.0.weight" not in shapes:
        raise CheckpointError(f"U-Net with class labels ({_few(label, 1)}, e.g. the SD 2 x4 upscaler) is not supported")
    if "middle_block.1.proj_in.weight" not in shapes:
        raise CheckpointError(f"not an SD U-Net in the original layout: no middle_block.1.proj_in.weight; "
                              f"found {_few(shapes)}")
    blocks = {int(k.split(".")[1]) for k in shapes if k.startswith("input_blocks.")}
    downsamples = sorted(int(k.split(".")[1]) for k in shapes if k.startswith("input_blocks.") and ".0.op." in k
                         and k.endswith("weight"))
    n = downsamples[0] - 1 if downsamples else max(blocks)  # layers per block
    levels = len(downsamples) + 1
    if max(blocks) != levels * (n + 1) - 1 or n < 1:
        raise CheckpointError(f"U-Net input_blocks 0..{max(blocks)} do not fit {levels} levels of {n} layers "
                              f"(downsampling in input_blocks {downsamples})")
    first = [1 + level * (n + 1) for level in range(levels)]
    channels = tuple(shapes[f"input_blocks.{i}.0.out_layers.3.weight"][0] for i in first)
    attention = tuple(f"input_blocks.{i}.1.proj_in.weight" in shapes for i in first)

    def depth(prefix: str) -> int:  # transformer layers in one SpatialTransformer
        head = f"{prefix}.transformer_blocks."
        return len({k[len(head):].split(".")[0] for k in shapes if k.startswith(head)})

    # Levels without attention have no depth of their own; the lowest level's is the mid block's.
    depths = [depth(f"input_blocks.{i}.1") if a else 1 for i, a in zip(first, attention)]
    depths[-1] = depth("middle_block.1")
    context = next((shape[1] for k, shape in shapes.items() if k.endswith("attn2.to_k.weight")), None)
    if context is None:  # every transformer of depth 0 (an SDXL "small" ControlNet): nothing tells
        raise CheckpointError("U-Net without cross-attention layers: cannot tell its text context width")
    linear = len(shapes["middle_block.1.proj_in.weight"]) == 2
    added = {}
    if "label_emb.0.0.weight" in shapes:  # SDXL: pooled text + time ids -> the timestep embedding
        added = dict(addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
                     projection_class_embeddings_input_dim=shapes["label_emb.0.0.weight"][1])

    if num_heads is None:
        if context == 768:  # SD 1.x
            num_heads = (8,) * levels
        elif context in (1024, 2048, 1280):  # SD 2.x, SDXL (and its refiner): 64 channels per head
            num_heads = tuple(max(c // 64, 1) for c in channels)
        else:
            raise CheckpointError(f"cannot tell the attention head count of a U-Net with context dim {context} "
                                  "(SD 1.x has 768, SD 2.x 1024, SDXL 2048); pass num_heads")
    return dict(
        in_channels=shapes["input_blocks.0.0.weight"][1],
        block_out_channels=channels,
        layers_per_block=n,
        attention_levels=attention,
        num_heads=tuple(num_heads),
        cross_attention_dim=context,
        use_linear_projection=linear,
        transformer_layers_per_block=tuple(depths),
        **added,
    )


def unet_from_original(state_dict: dict[str, torch.Tensor], config: UNetConfig) -> dict[str, torch.Tensor]:
    """Rename an original-layout U-Net state dict (no `model.diffusion_model.` prefix) to diffusers keys.

    Raises CheckpointError naming a few missing, unexpected or misshapen keys.
    """
    if config.time_cond_proj_dim is not None:
        raise CheckpointError(_LCM)
    return renamed(state_dict, {orig: diff for diff, orig in _key_map(config).items()}, _expected_shapes(config),
                   "U-Net")


def renamed(state_dict: dict[str, torch.Tensor], to_diffusers: dict[str, str],
            expected: dict[str, tuple[int, ...]], what: str) -> dict[str, torch.Tensor]:
    """state_dict with its keys renamed by to_diffusers, every key there and every shape as expected;
    CheckpointError naming a few missing, unexpected or misshapen keys of `what` ("U-Net", "ControlNet")."""
    missing = [k for k in to_diffusers if k not in state_dict]
    unexpected = [k for k in state_dict if k not in to_diffusers]
    if missing or unexpected:
        raise CheckpointError(f"{what} weights do not fit the inferred config: "
                              + "; ".join(f"{kind} {_few(keys)}" for kind, keys in
                                          [("missing", missing), ("unexpected", unexpected)] if keys))
    out = {to_diffusers[k]: v for k, v in state_dict.items()}
    wrong = [f"{k} {tuple(v.shape)} (expected {expected[k]})" for k, v in out.items() if tuple(v.shape) != expected[k]]
    if wrong:
        raise CheckpointError(f"{what} weights with wrong shapes: {_few(wrong, 2)}")
    return out


def unet_to_original(state_dict: dict[str, torch.Tensor], config: UNetConfig) -> dict[str, torch.Tensor]:
    """The inverse of unet_from_original: diffusers keys -> original keys (no prefix added)."""
    if config.time_cond_proj_dim is not None:
        raise CheckpointError(_LCM)
    to_original = _key_map(config)
    unknown = [k for k in state_dict if k not in to_original]
    if unknown:
        raise CheckpointError(f"not U-Net weights of this config: {_few(unknown)}")
    return {to_original[k]: v for k, v in state_dict.items()}
