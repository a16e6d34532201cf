"""load_pipeline / load_* end to end: diffusers folders and original single files.

Tiny random models built with diffusers and transformers (the oracles) are saved in
upstream's own formats; livestyle loads them with its own code and must give the same
outputs.
"""

import json

import pytest
import torch
from diffusers import (
    AutoencoderKL, AutoencoderTiny, EulerAncestralDiscreteScheduler, StableDiffusionPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from livestyle.errors import CheckpointError
from livestyle.models import load_autoencoder, load_pipeline, load_text_encoder, load_unet
from livestyle.models.convert_unet import unet_to_original
from livestyle.models.convert_vae import vae_to_original
from livestyle.models.taesd import TinyAutoencoder
from livestyle.models.tokenizer import bundled_vocab_and_merges
from livestyle.models.vae import KLAutoencoder
from random_weights import perturb

VOCAB = 49408  # CLIP's BPE vocabulary: single files use the tokenizer livestyle ships


def _fp16_exact(module):
    """Round weights to fp16 values, so a file saved in fp16 holds exactly these."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())
    return module


def _components(context, heads, linear_projection, text_layers=1, text_heads=4):
    torch.manual_seed(0)
    unet = perturb(UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=context,
        attention_head_dim=heads, use_linear_projection=linear_projection, norm_num_groups=32,
    ), 1)
    vae = perturb(AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
        latent_channels=4, norm_num_groups=32,
    ), 2)
    text = perturb(CLIPTextModel(CLIPTextConfig(
        hidden_size=context, intermediate_size=64, num_hidden_layers=text_layers,
        num_attention_heads=text_heads, vocab_size=VOCAB, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )), 3)
    return unet, vae, text


def _tokenizer(folder):
    vocab, merges = bundled_vocab_and_merges()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def _inputs(context):
    g = torch.Generator().manual_seed(7)
    return (torch.randn(2, 4, 12, 20, generator=g), torch.tensor([999.0, 250.0]),
            torch.randn(2, 77, context, generator=g), torch.rand(1, 3, 48, 80, generator=g))


def _check_parity(pipe, unet, vae, text, tokenizer, context):
    sample, t, ctx, image = _inputs(context)
    with torch.no_grad():
        assert (pipe.unet(sample, t, ctx) - unet(sample, t, encoder_hidden_states=ctx).sample).abs().max() <= 1e-4
        ref_latents = vae.encode(image * 2 - 1).latent_dist.mean * vae.config.scaling_factor
        assert (pipe.autoencoder.encode(image) - ref_latents).abs().max() <= 1e-4
        ref_image = ((vae.decode(ref_latents / vae.config.scaling_factor).sample + 1) / 2).clamp(0, 1)
        assert (pipe.autoencoder.decode(ref_latents) - ref_image).abs().max() <= 1e-4
        prompt = "a watercolor painting of a fox, (soft light), café"
        ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        assert pipe.text.tokenizer(prompt) == ids
        ref = text(torch.tensor([ids])).last_hidden_state
        assert (pipe.text.encoder(torch.tensor([ids])) - ref).abs().max() <= 1e-4


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    unet, vae, text = _components(context=32, heads=(2, 4), linear_projection=True)
    tokenizer = _tokenizer(root / "tok")
    scheduler = EulerAncestralDiscreteScheduler(timestep_spacing="trailing", prediction_type="v_prediction")
    StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(root / "model")
    return root / "model", (unet, vae, text, tokenizer)


def test_diffusers_folder(diffusers_folder):
    folder, (unet, vae, text, tokenizer) = diffusers_folder
    pipe = load_pipeline(folder)
    assert isinstance(pipe.autoencoder, KLAutoencoder)
    assert pipe.schedule.prediction_type == "v_prediction"
    assert pipe.family == "sd1"  # not a 1024-d context
    _check_parity(pipe, unet, vae, text, tokenizer, context=32)


def test_component_loaders_and_dtype(diffusers_folder):
    folder, (unet, _, _, _) = diffusers_folder
    ours = load_unet(folder / "unet", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    assert not any(p.requires_grad for p in ours.parameters())
    assert isinstance(load_autoencoder(folder / "vae"), KLAutoencoder)
    assert load_text_encoder(folder).encoder.config.hidden_size == 32


def test_tiny_autoencoder_swapped_in(diffusers_folder, tmp_path):
    folder, _ = diffusers_folder
    torch.manual_seed(0)
    tiny = perturb(AutoencoderTiny(encoder_block_out_channels=(64,) * 4, decoder_block_out_channels=(64,) * 4), 5)
    tiny.save_pretrained(tmp_path / "taesd")
    pipe = load_pipeline(folder, autoencoder=tmp_path / "taesd")
    assert isinstance(pipe.autoencoder, TinyAutoencoder)
    image = torch.rand(1, 3, 32, 48)
    with torch.no_grad():  # diffusers' AutoencoderTiny maps [-1, 1] images; ours takes [0, 1]
        ref = tiny.encode(image * 2 - 1).latents
        assert (pipe.autoencoder.encode(image) - ref).abs().max() <= 1e-4


def test_taesd_file_pair(tmp_path):
    tiny = TinyAutoencoder(latent_channels=4)
    save_file(tiny.encoder.state_dict(), str(tmp_path / "taesd_encoder.safetensors"))
    save_file(tiny.decoder.state_dict(), str(tmp_path / "taesd_decoder.safetensors"))
    for path in (tmp_path, tmp_path / "taesd_decoder.safetensors", tmp_path / "taesd_encoder.safetensors"):
        assert isinstance(load_autoencoder(path), TinyAutoencoder)
    (tmp_path / "taesd_encoder.safetensors").unlink()
    with pytest.raises(CheckpointError, match="taesd_encoder.safetensors is not beside it"):
        load_autoencoder(tmp_path / "taesd_decoder.safetensors")


def test_original_single_file_sd1(tmp_path):
    """An A1111-style single file, fp16, with SD 1.x's shapes: 768-d context, 8 heads."""
    unet, vae, text = (_fp16_exact(m) for m in _components(context=768, heads=8, linear_projection=False,
                                                           text_heads=12))
    ours_unet = load_unet  # the single-file path infers the config from shapes alone
    from livestyle.models.unet import UNetConfig

    unet_config = UNetConfig.from_diffusers(dict(unet.config))
    state = {f"model.diffusion_model.{k}": v for k, v in unet_to_original(unet.state_dict(), unet_config).items()}
    state |= {f"first_stage_model.{k}": v for k, v in vae_to_original(vae.state_dict()).items()}
    state |= {f"cond_stage_model.transformer.text_model.{k}": v for k, v in text.state_dict().items()}
    path = tmp_path / "tiny-sd15.safetensors"
    save_file({k: v.half().contiguous() for k, v in state.items()}, str(path))

    pipe = load_pipeline(path)
    assert pipe.family == "sd1"
    assert pipe.unet.config.num_heads == (8, 8)
    _check_parity(pipe, unet, vae, text, _tokenizer(tmp_path / "tok"), context=768)
    assert isinstance(ours_unet(path), torch.nn.Module)


def test_lora_fused_through_load_pipeline(diffusers_folder, tmp_path):
    folder, (unet, _, _, _) = diffusers_folder
    target = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    weight = unet.get_submodule(target).weight
    down, up = torch.randn(2, weight.shape[1]), torch.randn(weight.shape[0], 2)
    name = "lora_unet_" + target.replace(".", "_")
    save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(1.0)},
              str(tmp_path / "style.safetensors"))
    pipe = load_pipeline(folder, loras=((tmp_path / "style.safetensors", 0.5),))
    expected = weight + 0.5 * (1.0 / 2) * up @ down
    assert (pipe.unet.get_submodule(target).weight - expected).abs().max() <= 1e-5


def test_pickle_only_folder(diffusers_folder, tmp_path):
    folder, (unet, _, _, _) = diffusers_folder
    (tmp_path / "unet").mkdir()
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "unet" / "config.json").write_text(json.dumps(dict(unet.config)))
    torch.save(unet.state_dict(), tmp_path / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only pickle weights.*safe_serialization"):
        load_pipeline(tmp_path)


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_standalone_vae_file(diffusers_folder, tmp_path, layout):
    """A VAE file on its own (e.g. vae-ft-mse-840000), no config.json beside it."""
    _, (_, vae, _, _) = diffusers_folder
    state = vae.state_dict() if layout == "diffusers" else vae_to_original(vae.state_dict())
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "vae.safetensors"))
    ours = load_autoencoder(tmp_path / "vae.safetensors")
    image = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        ref = vae.encode(image * 2 - 1).latent_dist.mean * vae.config.scaling_factor
        assert (ours.encode(image) - ref).abs().max() <= 1e-4
