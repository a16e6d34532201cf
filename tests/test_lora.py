"""LoRA fusing: parity with diffusers' load_lora_weights + fuse_lora, key formats, errors."""

import copy
import json

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from livestyle.errors import CheckpointError
from livestyle.models.lora import fuse_lora, fuse_loras
from livestyle.models.unet import UNet, UNetConfig

RANK = 4


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Tiny SD-1.x-shaped U-Net and CLIP text encoder, plus what a pipeline needs around them."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
    ).eval()
    text = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_hidden_layers=2,
            vocab_size=300,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        )
    ).eval()
    vae = AutoencoderKL(
        block_out_channels=(8,),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=4,
    )
    folder = tmp_path_factory.mktemp("tokenizer")
    chars = [chr(c) for c in range(33, 127)] + [chr(c) for c in range(161, 161 + 162)]  # 256 one-char tokens
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars[:20])})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    return dict(unet=unet, text=text, vae=vae, tokenizer=tokenizer, scheduler=DDIMScheduler())


def fresh(base):
    return copy.deepcopy(base["unet"]), copy.deepcopy(base["text"])


def diffusers_fused(base, files_and_scales):
    """diffusers' result: load each LoRA file into a pipeline, fuse it at its scale, unload."""
    unet, text = fresh(base)
    pipe = StableDiffusionPipeline(
        unet=unet,
        text_encoder=text,
        tokenizer=base["tokenizer"],
        vae=base["vae"],
        scheduler=base["scheduler"],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    for path, scale in files_and_scales:
        pipe.load_lora_weights(str(path))
        pipe.fuse_lora(lora_scale=scale)
        pipe.unload_lora_weights()  # keeps the fused weights, drops the LoRA layers
    return pipe.unet.state_dict(), pipe.text_encoder.state_dict()


def assert_same_weights(ours: nn.Module, ref: dict, base_module: nn.Module, changed_at_least: int):
    mine, before = ours.state_dict(), base_module.state_dict()
    assert mine.keys() == ref.keys()
    worst = max((mine[k] - ref[k]).abs().max().item() for k in mine)
    assert worst <= 1e-5, worst
    changed = sum((mine[k] - before[k]).abs().max().item() > 1e-4 for k in mine)
    assert changed >= changed_at_least, changed


def peft_lora(base, tmp_path, name, seed, unet_targets, text_targets):
    """A LoRA file in the format diffusers' save_lora_weights writes (PEFT keys, alpha = rank)."""
    torch.manual_seed(seed)
    unet, text = fresh(base)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights=False, target_modules=unet_targets))
    text.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights=False, target_modules=text_targets))
    folder = tmp_path / name
    StableDiffusionPipeline.save_lora_weights(
        str(folder),
        unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(text),
    )
    return folder / "pytorch_lora_weights.safetensors"


# Kohya targets: linear attention layers, a 1x1 conv (proj_in), a 3x3 conv (LoCon), feed-forward.
KOHYA_UNET = {
    "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": ((RANK, 8), (8, RANK)),
    "down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": ((RANK, 16), (8, RANK)),
    "mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0": ((RANK, 16), (16, RANK)),
    "down_blocks_0_attentions_0_proj_in": ((RANK, 8, 1, 1), (8, RANK, 1, 1)),
    "up_blocks_1_attentions_1_proj_out": ((RANK, 8, 1, 1), (8, RANK, 1, 1)),
    "down_blocks_0_resnets_0_conv1": ((RANK, 8, 3, 3), (8, RANK, 1, 1)),
    "up_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj": ((RANK, 8), (64, RANK)),
}
KOHYA_TEXT = {
    "text_model_encoder_layers_0_mlp_fc1": ((RANK, 16), (32, RANK)),
    "text_model_encoder_layers_1_mlp_fc2": ((RANK, 32), (16, RANK)),
}
KOHYA_TEXT_ATTENTION = {
    "text_model_encoder_layers_0_self_attn_q_proj": ((RANK, 16), (16, RANK)),
    "text_model_encoder_layers_1_self_attn_out_proj": ((RANK, 16), (16, RANK)),
}


def kohya_lora(seed, alphas=None, unet=KOHYA_UNET, text=KOHYA_TEXT):
    """A random A1111/kohya LoRA; alphas: {name: alpha}, default 2.0 for every layer (alpha != rank)."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for prefix, layers in (("lora_unet_", unet), ("lora_te_", text)):
        for name, (down, up) in layers.items():
            lora[f"{prefix}{name}.lora_down.weight"] = torch.randn(down, generator=g) * 0.3
            lora[f"{prefix}{name}.lora_up.weight"] = torch.randn(up, generator=g) * 0.3
            alpha = 2.0 if alphas is None else alphas.get(name)
            if alpha is not None:
                lora[f"{prefix}{name}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
    return lora


# --- parity with diffusers ----------------------------------------------------------


def test_peft_format_matches_diffusers(base, tmp_path):
    path = peft_lora(
        base,
        tmp_path,
        "peft",
        seed=1,
        unet_targets=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "ff.net.0.proj"],
        text_targets=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    )
    lora = load_file(str(path))
    assert any(k.startswith("unet.") and k.endswith(".lora_A.weight") for k in lora)
    assert any(k.startswith("text_encoder.") for k in lora)
    ref_unet, ref_text = diffusers_fused(base, [(path, 0.7)])

    unet, text = fresh(base)
    count = fuse_lora(lora, 0.7, unet, text)
    assert count == len(lora) // 2
    assert_same_weights(unet, ref_unet, base["unet"], changed_at_least=40)
    assert_same_weights(text, ref_text, base["text"], changed_at_least=12)


def test_kohya_format_matches_diffusers(base, tmp_path):
    lora = kohya_lora(seed=2)
    path = tmp_path / "kohya.safetensors"
    save_file(lora, str(path))
    ref_unet, ref_text = diffusers_fused(base, [(path, 0.7)])

    unet, text = fresh(base)
    count = fuse_lora(load_file(str(path)), 0.7, unet, text)
    assert count == len(KOHYA_UNET) + len(KOHYA_TEXT)
    assert_same_weights(unet, ref_unet, base["unet"], changed_at_least=len(KOHYA_UNET))
    assert_same_weights(text, ref_text, base["text"], changed_at_least=len(KOHYA_TEXT))


def test_two_loras_at_once_match_diffusers_fusing_one_after_the_other(base, tmp_path):
    kohya = tmp_path / "kohya.safetensors"
    save_file(kohya_lora(seed=3), str(kohya))
    # (diffusers cannot load a PEFT text-encoder LoRA on MLP layers alone, hence q_proj.)
    peft = peft_lora(
        base, tmp_path, "peft", seed=4, unet_targets=["to_q", "to_v", "proj_in"], text_targets=["q_proj", "fc1"]
    )
    ref_unet, ref_text = diffusers_fused(base, [(kohya, 0.7), (peft, 0.4)])

    unet, text = fresh(base)
    fuse_loras([(load_file(str(kohya)), 0.7), (load_file(str(peft)), 0.4)], unet, text)
    assert_same_weights(unet, ref_unet, base["unet"], changed_at_least=len(KOHYA_UNET))
    assert_same_weights(text, ref_text, base["text"], changed_at_least=len(KOHYA_TEXT))


# --- the formula, alphas, and the other key spellings --------------------------------


def expected_delta(down, up, multiplier):
    down, up = down.double(), up.double()
    if down.ndim == 4 and down.shape[2:] != (1, 1):
        return torch.einsum("or,rihw->oihw", up[:, :, 0, 0], down) * multiplier
    delta = up.flatten(1) @ down.flatten(1)
    return (delta[:, :, None, None] if down.ndim == 4 else delta) * multiplier


def test_kohya_alphas_and_text_attention_follow_the_formula(base):
    """W + scale * alpha / rank * up @ down per layer, with per-layer alphas and one layer
    without alpha (multiplier 1). (diffusers cannot be the oracle here: it drops per-layer
    alphas of attention layers and kohya text-attention LoRAs with transformers 5.)"""
    alphas = {"down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": 1.0,
              "down_blocks_0_resnets_0_conv1": 8.0,
              "text_model_encoder_layers_0_self_attn_q_proj": 3.0}
    lora = kohya_lora(seed=5, alphas=alphas, text={**KOHYA_TEXT, **KOHYA_TEXT_ATTENTION})
    unet, text = fresh(base)
    fuse_lora(lora, 0.7, unet, text)
    for prefix, model, before, layers in (
        ("lora_unet_", unet, base["unet"], KOHYA_UNET),
        ("lora_te_", text, base["text"], {**KOHYA_TEXT, **KOHYA_TEXT_ATTENTION}),
    ):
        names = {n.removeprefix("text_model.").replace(".", "_"): n for n, _ in model.named_modules()}
        for name in layers:
            path = names[name.removeprefix("text_model_")]
            key = prefix + name
            multiplier = 0.7 * alphas.get(name, RANK) / RANK
            delta = expected_delta(lora[key + ".lora_down.weight"], lora[key + ".lora_up.weight"], multiplier)
            got = model.get_submodule(path).weight.double() - before.get_submodule(path).weight.double()
            assert (got - delta).abs().max() <= 1e-6, name
    # Nothing else moved.
    for model, before in ((unet, base["unet"]), (text, base["text"])):
        changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before.state_dict()[k])}
        assert len(changed) == len(KOHYA_UNET) if model is unet else len(KOHYA_TEXT) + len(KOHYA_TEXT_ATTENTION)


def respell(lora, style):
    """The kohya LoRA of `kohya_lora` in another key format, same weights and alphas."""
    out = {}
    for key, value in lora.items():
        stem, _, part = key.partition(".")
        unet = stem.startswith("lora_unet_")
        flat = stem.removeprefix("lora_unet_" if unet else "lora_te_")
        path = {**UNET_PATHS, **TEXT_PATHS}[flat]
        prefix = "base_model.model." if style == "bare_peft" else "unet." if unet else "text_encoder."
        down = part.startswith("lora_down")
        if part == "alpha":
            out[f"{prefix}{path}.alpha"] = value
        elif style == "peft":
            out[f"{prefix}{path}.lora_{'A' if down else 'B'}.weight"] = value
        elif style == "bare_peft":
            out[f"{prefix}{path}.lora_{'A' if down else 'B'}.weight"] = value
        elif style == "diffusers_old":
            # attention layers through processors, others via .lora / .lora_linear_layer
            parent, _, leaf = path.rpartition(".")
            if unet and ".attn" in path and leaf in ("to_q", "to_k", "to_v", "0"):
                parent, leaf = (parent[: -len(".to_out")], "to_out") if leaf == "0" else (parent, leaf)
                out[f"{prefix}{parent}.processor.{leaf}_lora.{'down' if down else 'up'}.weight"] = value
            elif not unet and "self_attn" in path:
                leaf = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}[leaf]
                out[f"{prefix}{parent}.{leaf}_lora.{'down' if down else 'up'}.weight"] = value
            elif unet:
                out[f"{prefix}{path}.lora.{'down' if down else 'up'}.weight"] = value
            else:
                out[f"{prefix}{path}.lora_linear_layer.{'down' if down else 'up'}.weight"] = value
    return dict(sorted(out.items(), key=lambda kv: not kv[0].endswith(".alpha")))  # alphas first


# The dotted paths of the kohya names above, written out (not derived) so the test checks the mapping.
UNET_PATHS = {
    "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k":
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0":
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "down_blocks_0_attentions_0_proj_in": "down_blocks.0.attentions.0.proj_in",
    "up_blocks_1_attentions_1_proj_out": "up_blocks.1.attentions.1.proj_out",
    "down_blocks_0_resnets_0_conv1": "down_blocks.0.resnets.0.conv1",
    "up_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj":
        "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj",
}
TEXT_PATHS = {
    "text_model_encoder_layers_0_mlp_fc1": "text_model.encoder.layers.0.mlp.fc1",
    "text_model_encoder_layers_1_mlp_fc2": "text_model.encoder.layers.1.mlp.fc2",
    "text_model_encoder_layers_0_self_attn_q_proj": "text_model.encoder.layers.0.self_attn.q_proj",
    "text_model_encoder_layers_1_self_attn_out_proj": "text_model.encoder.layers.1.self_attn.out_proj",
}


class TextModelHolder(nn.Module):
    """The transformers-4 / livestyle layout: the CLIP transformer under `text_model.`."""

    def __init__(self, text):
        super().__init__()
        self.text_model = text


@pytest.mark.parametrize("style", ["peft", "bare_peft", "diffusers_old"])
@pytest.mark.parametrize("layout", ["flat", "text_model"])
def test_every_key_format_fuses_the_same(base, style, layout):
    kohya = kohya_lora(seed=6, alphas={"down_blocks_0_resnets_0_conv1": 8.0, "up_blocks_1_attentions_1_proj_out": 3.0},
                       text={**KOHYA_TEXT, **KOHYA_TEXT_ATTENTION})
    if style == "diffusers_old":  # these formats carry no alphas
        kohya = {k: v for k, v in kohya.items() if not k.endswith(".alpha")}
    ref_unet, ref_text = fresh(base)
    fuse_lora(kohya, 0.7, ref_unet, ref_text)

    unet, text = fresh(base)
    # transformers 5 has the flat layout, transformers 4 (and livestyle) the text_model one.
    native = hasattr(text, "text_model")
    if layout == "text_model":
        holder = text if native else TextModelHolder(text)
    else:
        holder = text.text_model if native else text
    count = fuse_lora(respell(kohya, style), 0.7, unet, holder)
    assert count == len(KOHYA_UNET) + len(KOHYA_TEXT) + len(KOHYA_TEXT_ATTENTION)
    for k, v in unet.state_dict().items():
        assert torch.equal(v, ref_unet.state_dict()[k]), k
    for k, v in text.state_dict().items():
        assert torch.equal(v, ref_text.state_dict()[k]), k


def test_half_precision_weights_are_fused_in_fp32(base):
    lora = kohya_lora(seed=7)
    unet16, text16 = (m.half() for m in fresh(base))
    unet32, text32 = copy.deepcopy(unet16).float(), copy.deepcopy(text16).float()
    fuse_lora(lora, 0.7, unet16, text16)
    fuse_lora(lora, 0.7, unet32, text32)
    for ours, ref in ((unet16, unet32), (text16, text32)):
        for k, v in ours.state_dict().items():
            assert v.dtype == torch.float16
            assert torch.equal(v, ref.state_dict()[k].half()), k


def test_unet_only_lora_needs_no_text_encoder(base):
    lora = kohya_lora(seed=8, text={})
    unet, _ = fresh(base)
    assert fuse_lora(lora, 1.0, unet=unet) == len(KOHYA_UNET)


# --- original-SD (CompVis) U-Net names, into a livestyle UNet ----------------------------

# Level 0 with attention, level 1 without, one layer per block; an LCM config, whose
# cond_proj has no original name. Blocks: input_blocks 0 conv_in, 1 resnet+attention,
# 2 downsampler, 3 resnet; output_blocks 0, 1 (+ upsampler 1.1), 2, 3 with attention.
OURS = UNetConfig(block_out_channels=(8, 16), layers_per_block=1, attention_levels=(True, False), num_heads=(2, 2),
                  cross_attention_dim=16, norm_num_groups=4, time_cond_proj_dim=8)
# original name -> (diffusers name, down shape, up shape), written out so the test checks the mapping.
ORIGINAL_UNET = {
    "input_blocks_1_1_transformer_blocks_0_attn1_to_q":
        ("down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", (RANK, 8), (8, RANK)),
    "input_blocks_1_1_transformer_blocks_0_attn2_to_k":
        ("down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", (RANK, 16), (8, RANK)),
    "middle_block_1_proj_in": ("mid_block_attentions_0_proj_in", (RANK, 16, 1, 1), (16, RANK, 1, 1)),
    "output_blocks_3_0_in_layers_2": ("up_blocks_1_resnets_1_conv1", (RANK, 16, 3, 3), (8, RANK, 1, 1)),
    "output_blocks_0_0_emb_layers_1": ("up_blocks_0_resnets_0_time_emb_proj", (RANK, 32), (16, RANK)),
    "input_blocks_3_0_skip_connection": ("down_blocks_1_resnets_0_conv_shortcut", (RANK, 8, 1, 1), (16, RANK, 1, 1)),
    "output_blocks_2_1_transformer_blocks_0_ff_net_2":
        ("up_blocks_1_attentions_0_transformer_blocks_0_ff_net_2", (RANK, 32), (8, RANK)),
    "input_blocks_2_0_op": ("down_blocks_0_downsamplers_0_conv", (RANK, 8, 3, 3), (8, RANK, 1, 1)),
    "output_blocks_1_1_conv": ("up_blocks_0_upsamplers_0_conv", (RANK, 16, 3, 3), (16, RANK, 1, 1)),
    "time_embed_0": ("time_embedding_linear_1", (RANK, 8), (32, RANK)),
    "input_blocks_0_0": ("conv_in", (RANK, 4, 3, 3), (8, RANK, 1, 1)),
    "out_2": ("conv_out", (RANK, 8, 3, 3), (4, RANK, 1, 1)),
}


@pytest.fixture(scope="module")
def ours():
    torch.manual_seed(11)
    return UNet(OURS).eval()


def original_lora(seed, names):
    """The same random kohya LoRA spelled with original (names="original") or diffusers module names."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for i, (original, (diffusers_name, down, up)) in enumerate(ORIGINAL_UNET.items()):
        stem = "lora_unet_" + (original if names == "original" else diffusers_name)
        lora[stem + ".lora_down.weight"] = torch.randn(down, generator=g) * 0.3
        lora[stem + ".lora_up.weight"] = torch.randn(up, generator=g) * 0.3
        lora[stem + ".alpha"] = torch.tensor(1.0 + i)
    return lora


def test_original_sd_names_fuse_like_diffusers_names(ours):
    by_original, by_diffusers = copy.deepcopy(ours), copy.deepcopy(ours)
    assert fuse_lora(original_lora(12, "original"), 0.7, unet=by_original) == len(ORIGINAL_UNET)
    assert fuse_lora(original_lora(12, "diffusers"), 0.7, unet=by_diffusers) == len(ORIGINAL_UNET)
    before = ours.state_dict()
    changed = {k for k, v in by_original.state_dict().items() if not torch.equal(v, before[k])}
    assert len(changed) == len(ORIGINAL_UNET)
    for k, v in by_original.state_dict().items():
        assert torch.equal(v, by_diffusers.state_dict()[k]), k


def test_original_and_diffusers_names_of_one_layer_collide(ours):
    lora = {**down_up("lora_unet_middle_block_1_proj_in", (RANK, 16, 1, 1), (16, RANK, 1, 1)),
            **down_up("lora_unet_mid_block_attentions_0_proj_in", (RANK, 16, 1, 1), (16, RANK, 1, 1))}
    with pytest.raises(CheckpointError, match="targets one layer twice"):
        fuse_lora(lora, 1.0, unet=copy.deepcopy(ours))


@pytest.mark.parametrize("stem", ["lora_unet_input_blocks_7_1_proj_in",  # no such block
                                  "lora_unet_output_blocks_0_1_proj_in",  # level 1 has no attention
                                  "lora_unet_middle_block_1_norm"])  # a GroupNorm, no LoRA target
def test_unknown_original_names_are_named(ours, stem):
    unet = copy.deepcopy(ours)
    with pytest.raises(CheckpointError, match=f"match nothing.*{stem}"):
        fuse_lora(down_up(stem), 1.0, unet=unet)
    for k, v in unet.state_dict().items():
        assert torch.equal(v, ours.state_dict()[k]), k


def test_original_names_need_a_livestyle_unet(base):
    unet, _ = fresh(base)  # diffusers' UNet2DConditionModel: it has a config, but not ours
    with pytest.raises(CheckpointError, match="original SD block names.*livestyle UNet"):
        fuse_lora(original_lora(13, "original"), 1.0, unet=unet)


# --- errors ---------------------------------------------------------------------------


def down_up(key_stem, down=(RANK, 16), up=(16, RANK), suffixes=(".lora_down.weight", ".lora_up.weight")):
    return {key_stem + suffixes[0]: torch.randn(down), key_stem + suffixes[1]: torch.randn(up)}


@pytest.mark.parametrize(
    "lora, message",
    [
        (down_up("lora_te2_text_model_encoder_layers_0_self_attn_q_proj"),
         "targets the second text encoder, but no second text encoder was given"),
        (down_up("text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj",
                 suffixes=(".lora_A.weight", ".lora_B.weight")), "no second text encoder was given"),
        (down_up("lora_unet_input_blocks_1_1_proj_in"), "original SD block names"),
        ({"foo.bar": torch.zeros(2), "lora_unet_x.lora_down.weight": torch.zeros(2)}, "no known format: foo.bar"),
        (down_up("lora_unet_down_blocks_9_attentions_0_proj_in"), "down_blocks_9_attentions_0_proj_in"),
        (down_up("unet.down_blocks.0.nothing_here", suffixes=(".lora_A.weight", ".lora_B.weight")),
         "match nothing.*unet.down_blocks.0.nothing_here"),
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(RANK, 8, 1, 1)},
         "without both down and up"),
        ({**down_up("lora_unet_down_blocks_0_attentions_0_proj_in"),
          "lora_unet_down_blocks_0_attentions_0_proj_in.dora_scale": torch.ones(8)}, "DoRA"),
        ({"lora_unet_x.hada_w1_a": torch.zeros(2)}, "LoHa"),
        ({}, "no tensors"),
    ],
)
def test_bad_loras_are_refused_with_a_useful_message(base, lora, message):
    unet, text = fresh(base)
    with pytest.raises(CheckpointError, match=message):
        fuse_lora(lora, 1.0, unet, text)


def test_shape_mismatch_names_the_layer(base):
    # attn2.to_k takes the 16-wide text features; an SD 2.x LoRA would bring 1024.
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    lora = down_up(stem, down=(RANK, 24), up=(8, RANK))
    unet, text = fresh(base)
    with pytest.raises(CheckpointError, match=r"attn2_to_k does not fit the U-Net.*\(8, 16\)"):
        fuse_lora(lora, 1.0, unet, text)


def test_text_encoder_lora_without_text_encoder_is_refused(base):
    unet, _ = fresh(base)
    with pytest.raises(CheckpointError, match="no text encoder was given"):
        fuse_lora(kohya_lora(seed=9), 1.0, unet=unet)


def test_nothing_is_fused_unless_everything_fits(base):
    good = kohya_lora(seed=10)
    bad = {**good, **down_up("lora_unet_down_blocks_0_attentions_0_proj_in", down=(RANK, 3, 1, 1), up=(8, RANK, 1, 1))}
    unet, text = fresh(base)
    with pytest.raises(CheckpointError, match="proj_in does not fit"):
        fuse_lora(bad, 1.0, unet, text)
    with pytest.raises(CheckpointError, match="LoRA 2 of 2: .*no second text encoder"):
        fuse_loras([(good, 1.0), (down_up("lora_te2_text_model_encoder_layers_0_mlp_fc1"), 1.0)], unet, text)
    for model, before in ((unet, base["unet"]), (text, base["text"])):
        for k, v in model.state_dict().items():
            assert torch.equal(v, before.state_dict()[k]), k
