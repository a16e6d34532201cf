"""SDXL pipelines end to end: a diffusers StableDiffusionXLPipeline folder and the original
single file, loaded by livestyle, give diffusers' U-Net output for a prompt (both encoders,
pooled text_embeds, time ids); SDXL LoRAs reach both encoders; mismatches are one line."""

import json

import pytest
import torch
from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from livestyle.errors import CheckpointError
from livestyle.models import NoiseSchedule, Pipeline, load_pipeline
from livestyle.models.convert_unet import unet_to_original
from livestyle.models.convert_vae import vae_to_original
from livestyle.models.prompt import SDXLPrompt
from livestyle.models.tokenizer import bundled_vocab_and_merges
from random_weights import perturb
from test_sdxl_text import to_openclip

VOCAB = 49408
POOLED, TIME_DIM = 24, 256  # SDXL's time-id width (single files do not store it); pooled shrunk from 1280
CONTEXT = 64 + 64  # the two encoders side by side (SDXL: 768 + 1280); 64-d heads as both of SDXL's
PROMPT = "a watercolor painting of a fox, soft light"


def components():
    torch.manual_seed(0)
    unet = perturb(UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=(2, 4),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), cross_attention_dim=CONTEXT, use_linear_projection=True,
        norm_num_groups=32, addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM,
    ), 1, scale=0.1)
    vae = perturb(AutoencoderKL(  # 4 levels: SD's 8x reduction, as the streaming engine needs
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32,
        scaling_factor=0.13025, force_upcast=True,
    ), 2)
    common = dict(vocab_size=VOCAB, max_position_embeddings=77, bos_token_id=49406, eos_token_id=2, pad_token_id=1)
    text = perturb(CLIPTextModel(CLIPTextConfig(hidden_size=64, intermediate_size=37, num_hidden_layers=2,
                                                num_attention_heads=1, hidden_act="quick_gelu", **common)), 3)
    text_2 = perturb(CLIPTextModelWithProjection(CLIPTextConfig(  # single files hold no head count: 64-d assumed
        hidden_size=64, intermediate_size=67, num_hidden_layers=2, num_attention_heads=1, hidden_act="gelu",
        projection_dim=POOLED, **common)), 4)
    return unet, vae, text, text_2


def tokenizers(folder):
    vocab, merges = bundled_vocab_and_merges()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    files = (str(folder / "vocab.json"), str(folder / "merges.txt"))
    return CLIPTokenizer(*files, model_max_length=77), CLIPTokenizer(*files, pad_token="!", model_max_length=77)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    unet, vae, text, text_2 = components()
    tok, tok_2 = tokenizers(root / "tok")
    scheduler = EulerAncestralDiscreteScheduler(timestep_spacing="trailing")  # SDXL-Turbo's
    ref = StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tok,
                                    tokenizer_2=tok_2, unet=unet, scheduler=scheduler)
    ref.save_pretrained(root / "model")
    return root, ref


def reference(ref, height, width):
    """diffusers' U-Net output for PROMPT at height x width pixels, as StableDiffusionXLPipeline calls it."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, height // 8, width // 8, generator=g)
    t = torch.tensor([999.0, 500.0])
    with torch.no_grad():
        context, _, pooled, _ = ref.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
        time_ids = ref._get_add_time_ids((height, width), (0, 0), (height, width), torch.float32,
                                         text_encoder_projection_dim=POOLED)
        out = ref.unet(x, t, context.expand(2, -1, -1), added_cond_kwargs={
            "text_embeds": pooled.expand(2, -1), "time_ids": time_ids.expand(2, -1)}).sample
    return x, t, out


def ours(pipe, x, t, height, width):
    prompt = pipe.prompt_cache()(PROMPT)
    assert isinstance(prompt, SDXLPrompt)
    assert prompt.context.shape == (1, 77, CONTEXT) and prompt.pooled.shape == (1, POOLED)
    with torch.no_grad():
        return pipe.unet(x, t, prompt.context.expand(2, -1, -1), text_embeds=prompt.pooled.expand(2, -1),
                         time_ids=pipe.time_ids(height, width).expand(2, -1))


def test_diffusers_folder_end_to_end(sdxl):
    root, ref = sdxl
    pipe = load_pipeline(root / "model")
    assert pipe.family == "sdxl" and pipe.zero_empty_negative
    assert pipe.text.encoder.config.projection_dim is None and pipe.text_2.encoder.config.projection_dim == POOLED
    assert pipe.text.tokenizer.pad_id == pipe.text.tokenizer.eos_id and pipe.text_2.tokenizer.pad_id == 0  # "!"
    assert pipe.autoencoder.config.scaling_factor == 0.13025
    x, t, want = reference(ref, 48, 80)  # non-square
    assert (ours(pipe, x, t, 48, 80) - want).abs().max() <= 1e-4
    assert torch.equal(pipe.time_ids(48, 80), torch.tensor([[48.0, 80.0, 0.0, 0.0, 48.0, 80.0]]))


def test_inspect_names_sdxl(sdxl, capsys):
    from livestyle.cli import main

    root, _ = sdxl
    assert main(["inspect", str(root / "model"), "--dtype", "fp16"]) == 0
    out = capsys.readouterr().out
    assert "SDXL pipeline" in out and "kept in fp32" in out
    assert "text         " in out and "2 transformer layers, 64-d\n" in out
    assert "text_2       " in out and "pooled projection 24-d" in out


def single_file(ref) -> dict:
    """The original SDXL single-file layout, built from the diffusers components by the inverse mappings."""
    from livestyle.models.unet import UNetConfig

    state = {}
    config = UNetConfig.from_diffusers(dict(ref.unet.config))
    state.update({"model.diffusion_model." + k: v for k, v in unet_to_original(ref.unet.state_dict(), config).items()})
    state.update({"first_stage_model." + k: v for k, v in vae_to_original(ref.vae.state_dict()).items()})
    text = {k if k.startswith("text_model.") else "text_model." + k: v
            for k, v in ref.text_encoder.state_dict().items()}  # transformers 5 drops `text_model.`
    state.update({"conditioner.embedders.0.transformer." + k: v for k, v in text.items()})
    state.update({"conditioner.embedders.1." + k: v for k, v in to_openclip(ref.text_encoder_2).items()})
    return {k: v.contiguous() for k, v in state.items()}


def test_single_file_end_to_end(sdxl, tmp_path):
    _, ref = sdxl
    path = tmp_path / "sdxl_turbo.safetensors"
    save_file(single_file(ref), str(path))
    pipe = load_pipeline(path, num_heads=(2, 4))  # heads: not in the weights (SDXL's own 64-d ones are assumed)
    assert pipe.family == "sdxl" and pipe.autoencoder.config.scaling_factor == 0.13025
    x, t, want = reference(ref, 64, 40)
    assert (ours(pipe, x, t, 64, 40) - want).abs().max() <= 1e-4
    half = load_pipeline(path, dtype=torch.float16, num_heads=(2, 4))  # SDXL's VAE has no config here: upcast
    assert next(half.autoencoder.parameters()).dtype == torch.float32
    assert next(half.unet.parameters()).dtype == torch.float16


def test_sdxl_loras_reach_both_encoders(sdxl, tmp_path):
    """A kohya LoRA (lora_unet_ original block names, lora_te1_, lora_te2_, alpha) at 0.5 and a
    diffusers/PEFT one (unet., text_encoder., text_encoder_2.) at 1.0, fused at load."""
    root, ref = sdxl
    g = torch.Generator().manual_seed(9)
    r = 2
    files = {"kohya": {}, "peft": {}}
    expected = {}

    def add(kind, stem, which, layer, shape, alpha=None):
        """which: 0 the U-Net, 1 the first text encoder, 2 the second; layer: its dotted path there."""
        down, up = torch.randn(r, shape[1], generator=g), torch.randn(shape[0], r, generator=g)
        suffixes = (".lora_down.weight", ".lora_up.weight") if kind == "kohya" else (".lora_A.weight", ".lora_B.weight")
        files[kind][stem + suffixes[0]], files[kind][stem + suffixes[1]] = down, up
        if alpha is not None:
            files[kind][stem + ".alpha"] = torch.tensor(float(alpha))
        scale = 0.5 if kind == "kohya" else 1.0
        expected[(which, layer)] = scale * (alpha or r) / r * up @ down

    add("kohya", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 1,
        "text_model.encoder.layers.0.self_attn.q_proj", (64, 64), alpha=1)
    add("kohya", "lora_te2_text_model_encoder_layers_1_mlp_fc1", 2, "text_model.encoder.layers.1.mlp.fc1", (67, 64))
    add("kohya", "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k", 0,
        "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k", (64, CONTEXT))
    add("peft", "text_encoder.text_model.encoder.layers.1.self_attn.v_proj", 1,
        "text_model.encoder.layers.1.self_attn.v_proj", (64, 64))
    add("peft", "text_encoder_2.text_model.encoder.layers.0.mlp.fc2", 2,
        "text_model.encoder.layers.0.mlp.fc2", (64, 67))
    add("peft", "unet.up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q", 0,
        "up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q", (64, 64))
    for kind, lora in files.items():
        save_file(lora, str(tmp_path / f"{kind}.safetensors"))

    pipe = load_pipeline(root / "model", loras=((tmp_path / "kohya.safetensors", 0.5),
                                                (tmp_path / "peft.safetensors", 1.0)))
    for (which, layer), delta in expected.items():
        fused = (pipe.unet, pipe.text.encoder, pipe.text_2.encoder)[which].get_parameter(layer + ".weight")
        # the saved weights: transformers 5's CLIPTextModel names its layers without `text_model.`
        original = (ref.unet, ref.text_encoder, ref.text_encoder_2)[which]
        name = layer.removeprefix("text_model.") if which == 1 else layer
        assert torch.allclose(fused - original.get_parameter(name + ".weight"), delta, atol=1e-5), layer


def test_mismatched_parts_are_one_line(sdxl, tmp_path):
    root, _ = sdxl
    broken = tmp_path / "one_encoder"
    broken.mkdir()
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (broken / name).symlink_to(root / "model" / name, target_is_directory=True)
    with pytest.raises(CheckpointError, match="U-Net is SDXL's .*, but there is one text encoder"):
        load_pipeline(broken)
    (broken / "text_encoder_2").symlink_to(root / "model" / "text_encoder", target_is_directory=True)
    (broken / "tokenizer_2").symlink_to(root / "model" / "tokenizer", target_is_directory=True)
    with pytest.raises(CheckpointError, match="added embedding takes 1560 features, .* 64-d pooled output and 6 time "
                                              "ids make 1600"):
        load_pipeline(broken)
    sd1 = Pipeline("sd1", unet=None, autoencoder=None, text=None, schedule=NoiseSchedule(), source=root)
    with pytest.raises(ValueError, match="SDXL's conditioning"):
        sd1.time_ids(64, 64)


def test_livestyle_run_streams_an_sdxl_checkpoint(sdxl, tmp_path, capsys):
    from livestyle.cli import main

    root, _ = sdxl
    out = tmp_path / "out.mp4"
    code = main(["run", "test:", "--model", str(root / "model"), "--prompt", "a fox", "--input-size", "64x48",
                 "--size", "64x48", "--seconds", "0.25", "-o", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert "restyled 6 frames" in stdout and "sdxl model" in stdout and "failed" not in stdout + err
    assert "Traceback" not in err and out.stat().st_size > 0
