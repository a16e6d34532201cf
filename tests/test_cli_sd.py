"""`livestyle run` with an SD checkpoint: a tiny diffusers folder, saved by diffusers,
through the same engine path as the demo model (text prompt, LCM steps, stream batch)."""

import pytest
from diffusers import AutoencoderTiny, LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from media_clips import make_clip, video_facts
from transformers import CLIPTextConfig, CLIPTextModel

from livestyle import cli
from random_weights import perturb
from test_loading import _tokenizer


def write_tiny_sd(root) -> UNet2DConditionModel:
    """A tiny SD 1.x diffusers folder at root / "model" (LCM scheduler); returns its U-Net
    (a ControlNet can be made from it)."""
    unet = perturb(UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), norm_num_groups=32), 1)
    vae = perturb(AutoencoderTiny(), 2, scale=0.01)
    text = perturb(CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=49408,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)), 3)
    StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=_tokenizer(root / "tok"), unet=unet,
                            scheduler=LCMScheduler(), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(root / "model")
    return unet


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    write_tiny_sd(root)
    return root / "model"


@pytest.mark.parametrize("steps", [1, 2])
def test_run_a_diffusers_folder_with_a_prompt(sd_folder, tmp_path, capsys, steps):
    clip = make_clip(tmp_path / "in.mp4", size=(80, 64), frames=8)
    out = tmp_path / "out.mp4"
    code = cli.main(["run", str(clip), "-o", str(out), "--model", str(sd_folder), "--prompt", "an oil painting",
                     "--size", "64x48", "--steps", str(steps), "--strength", "0.6"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert "sd1 model" in stdout and f"{steps} step" in stdout
    facts = video_facts(out)
    assert facts["frames"] == 8 and facts["size"] == (80, 64)


def test_an_sd_checkpoint_without_a_prompt_is_refused(sd_folder, tmp_path, capsys):
    clip = make_clip(tmp_path / "in.mp4", size=(64, 48), frames=2)
    code = cli.main(["run", str(clip), "-o", str(tmp_path / "out.mp4"), "--model", str(sd_folder)])
    assert code == 2 and "needs a prompt" in capsys.readouterr().err
    assert not (tmp_path / "out.mp4").exists()


def test_run_an_sdxl_folder_at_the_inputs_size(tmp_path, capsys):
    """An SDXL pipeline (test_sdxl_pipeline's tiny one, saved by diffusers): no --size keeps a
    small input's own size (SD's rule: the short side up to 512, never upscaled)."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline

    from test_sdxl_pipeline import components, tokenizers

    unet, vae, text, text_2 = components()
    tok, tok_2 = tokenizers(tmp_path / "tok")
    StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tok, tokenizer_2=tok_2,
                              unet=unet, scheduler=EulerAncestralDiscreteScheduler(timestep_spacing="trailing")
                              ).save_pretrained(tmp_path / "sdxl")
    clip = make_clip(tmp_path / "in.mp4", size=(80, 64), frames=4)
    out = tmp_path / "out.mp4"
    code = cli.main(["run", str(clip), "-o", str(out), "--model", str(tmp_path / "sdxl"), "--prompt", "a fox"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert "sdxl model" in stdout and "at 80x64" in stdout
    facts = video_facts(out)
    assert facts["frames"] == 4 and facts["size"] == (80, 64)
