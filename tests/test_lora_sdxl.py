"""SDXL LoRAs: kohya (lora_unet_ original block names, lora_te1_/lora_te2_) and diffusers/PEFT
(unet., text_encoder., text_encoder_2.) fused like diffusers' StableDiffusionXLPipeline
load_lora_weights + fuse_lora, on a tiny SDXL-shaped pipeline."""

import copy
import json

import pytest
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from livestyle.errors import CheckpointError
from livestyle.models.convert_unet import original_module_names
from livestyle.models.lora import fuse_lora, fuse_loras
from livestyle.models.unet import UNet, UNetConfig

RANK = 4
HIDDEN_1, HIDDEN_2, POOLED = 16, 24, 24  # text widths; the U-Net's context is 16 + 24


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), cross_attention_dim=HIDDEN_1 + HIDDEN_2,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=POOLED + 6 * 8, norm_num_groups=32,
    ).eval()

    def text_config(hidden):
        return CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=2,
                              num_hidden_layers=2, vocab_size=300, max_position_embeddings=16, bos_token_id=0,
                              eos_token_id=2, pad_token_id=1, projection_dim=POOLED)

    text = CLIPTextModel(text_config(HIDDEN_1)).eval()
    text_2 = CLIPTextModelWithProjection(text_config(HIDDEN_2)).eval()
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4)
    folder = tmp_path_factory.mktemp("tokenizer")
    chars = [chr(c) for c in range(33, 127)]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    return dict(unet=unet, text=text, text_2=text_2, vae=vae, tokenizer=tokenizer)


def diffusers_fused(base, path, scale):
    pipe = StableDiffusionXLPipeline(
        vae=base["vae"], text_encoder=copy.deepcopy(base["text"]), text_encoder_2=copy.deepcopy(base["text_2"]),
        tokenizer=base["tokenizer"], tokenizer_2=base["tokenizer"], unet=copy.deepcopy(base["unet"]),
        scheduler=EulerDiscreteScheduler(),
    )
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()
    return pipe.unet.state_dict(), pipe.text_encoder.state_dict(), pipe.text_encoder_2.state_dict()


def ours(base):
    """Our U-Net (its config numbers the original blocks) and copies of the text encoders."""
    unet = UNet(UNetConfig.from_diffusers(dict(base["unet"].config))).eval()
    unet.load_state_dict(base["unet"].state_dict(), strict=True)
    return unet, copy.deepcopy(base["text"]), copy.deepcopy(base["text_2"])


def assert_fused_like(mine, ref, before, at_least):
    mine = mine.state_dict()
    assert mine.keys() == ref.keys()
    worst = max((mine[k] - ref[k]).abs().max().item() for k in mine)
    assert worst <= 1e-5, worst
    changed = sum((mine[k] - before[k]).abs().max().item() > 1e-4 for k in mine)
    assert changed >= at_least, changed


# kohya-ss sd-scripts names for SDXL: original-SD U-Net blocks. Level 0 (input_blocks 1, 2;
# 3 is its downsampler) has no attention; level 1 (input_blocks 4, 5) has depth 2.
KOHYA_UNET = {
    "input_blocks_4_1_transformer_blocks_0_attn1_to_q": ((RANK, 64), (64, RANK)),
    "input_blocks_5_1_transformer_blocks_1_attn2_to_k": ((RANK, 40), (64, RANK)),
    "middle_block_1_transformer_blocks_1_ff_net_0_proj": ((RANK, 64), (512, RANK)),
    "middle_block_1_proj_in": ((RANK, 64), (64, RANK)),
    "output_blocks_1_1_transformer_blocks_0_attn1_to_out_0": ((RANK, 64), (64, RANK)),
    "output_blocks_2_1_proj_out": ((RANK, 64), (64, RANK)),
    "input_blocks_1_0_in_layers_2": ((RANK, 32, 3, 3), (32, RANK, 1, 1)),
    "output_blocks_4_0_emb_layers_1": ((RANK, 128), (32, RANK)),
    "label_emb_0_0": ((RANK, POOLED + 48), (128, RANK)),
}
KOHYA_TEXT_1 = {"text_model_encoder_layers_0_mlp_fc1": ((RANK, HIDDEN_1), (2 * HIDDEN_1, RANK))}
KOHYA_TEXT_2 = {"text_model_encoder_layers_1_mlp_fc2": ((RANK, 2 * HIDDEN_2), (HIDDEN_2, RANK))}


def kohya_sdxl_lora(seed, alpha=2.0):
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for prefix, layers in (("lora_unet_", KOHYA_UNET), ("lora_te1_", KOHYA_TEXT_1), ("lora_te2_", KOHYA_TEXT_2)):
        for name, (down, up) in layers.items():
            lora[f"{prefix}{name}.lora_down.weight"] = torch.randn(down, generator=g) * 0.3
            lora[f"{prefix}{name}.lora_up.weight"] = torch.randn(up, generator=g) * 0.3
            lora[f"{prefix}{name}.alpha"] = torch.tensor(alpha)
    return lora


def test_kohya_sdxl_matches_diffusers(base, tmp_path):
    path = tmp_path / "kohya-sdxl.safetensors"
    save_file(kohya_sdxl_lora(seed=1), str(path))
    ref_unet, ref_text, ref_text_2 = diffusers_fused(base, path, 0.7)
    unet, text, text_2 = ours(base)
    count = fuse_lora(load_file(str(path)), 0.7, unet, text, text_2)
    assert count == len(KOHYA_UNET) + len(KOHYA_TEXT_1) + len(KOHYA_TEXT_2)
    assert_fused_like(unet, ref_unet, base["unet"].state_dict(), len(KOHYA_UNET))
    assert_fused_like(text, ref_text, base["text"].state_dict(), len(KOHYA_TEXT_1))
    assert_fused_like(text_2, ref_text_2, base["text_2"].state_dict(), len(KOHYA_TEXT_2))


def test_kohya_sdxl_names_resolve_to_these_layers(base):
    """The original names above, written out as diffusers paths (not derived from the table)."""
    names = original_module_names(UNetConfig.from_diffusers(dict(base["unet"].config)))
    assert names["input_blocks.4.1.transformer_blocks.0.attn1.to_q"] == \
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert names["input_blocks.5.1.transformer_blocks.1.attn2.to_k"] == \
        "down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_k"
    assert names["output_blocks.2.1.proj_out"] == "up_blocks.0.attentions.2.proj_out"
    assert names["output_blocks.4.0.emb_layers.1"] == "up_blocks.1.resnets.1.time_emb_proj"
    assert names["label_emb.0.0"] == "add_embedding.linear_1"


def test_peft_sdxl_matches_diffusers(base, tmp_path):
    torch.manual_seed(3)
    unet, text, text_2 = (copy.deepcopy(base[k]) for k in ("unet", "text", "text_2"))
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2"]))
    text.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights=False, target_modules=["q_proj", "fc1"]))
    text_2.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights=False, target_modules=["v_proj", "fc2"]))
    StableDiffusionXLPipeline.save_lora_weights(
        str(tmp_path / "peft"), unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(text),
        text_encoder_2_lora_layers=get_peft_model_state_dict(text_2))
    path = tmp_path / "peft" / "pytorch_lora_weights.safetensors"
    lora = load_file(str(path))
    assert any(k.startswith("text_encoder_2.") for k in lora)
    ref_unet, ref_text, ref_text_2 = diffusers_fused(base, path, 0.6)
    unet, text, text_2 = ours(base)
    assert fuse_lora(lora, 0.6, unet, text, text_2) == len(lora) // 2
    assert_fused_like(unet, ref_unet, base["unet"].state_dict(), 30)
    assert_fused_like(text, ref_text, base["text"].state_dict(), 4)
    assert_fused_like(text_2, ref_text_2, base["text_2"].state_dict(), 4)


def test_sdxl_lora_fits_everything_or_changes_nothing(base):
    good = kohya_sdxl_lora(seed=4)
    unet, text, text_2 = ours(base)
    before = [m.state_dict() for m in (unet, text, text_2)]
    before = [{k: v.clone() for k, v in s.items()} for s in before]
    # A second-encoder LoRA sized for the first (an SD 1.x text LoRA renamed, say) fails last.
    bad = {"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(RANK, HIDDEN_1),
           "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(2 * HIDDEN_1, RANK)}
    with pytest.raises(CheckpointError, match="LoRA 2 of 2: .*fc1 does not fit the second text encoder"):
        fuse_loras([(good, 1.0), (bad, 1.0)], unet, text, text_2)
    for model, state in zip((unet, text, text_2), before):
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(CheckpointError, match="no second text encoder was given"):
        fuse_lora(good, 1.0, unet, text)
