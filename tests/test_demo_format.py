"""The demo model: LiteAutoencoder, StyleBank, the demo folder format, and sample_bridge.

Tiny random weights throughout; the folder written by save_demo_model must load back
through load_pipeline with the same (fp16-rounded) weights, and its unet/config.json
must describe the same network to diffusers (the oracle) as to livestyle.
"""

import json
import subprocess
import sys

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from livestyle.errors import CheckpointError, LivestyleError
from livestyle.models import demo, load_autoencoder, load_pipeline
from livestyle.models.demo import demo_unet_config, save_demo_model, unet_config_to_diffusers
from livestyle.models.lite_autoencoder import LiteAutoencoder, LiteAutoencoderConfig
from livestyle.models.loading import NoiseSchedule
from livestyle.models.styles import StyleBank
from livestyle.models.unet import UNet, UNetConfig
from livestyle.stream.samplers import bridge_step, sample_bridge
from random_weights import perturb

LATENT, STYLE_DIM = 4, 16


def _parts(seed=0):
    torch.manual_seed(seed)
    unet = perturb(UNet(demo_unet_config(LATENT, STYLE_DIM)), seed + 1)
    vae = LiteAutoencoder(LiteAutoencoderConfig(latent_channels=LATENT, width=16)).eval()
    styles = StyleBank.random(["ink", "pastel", "neon"], tokens=3, dim=STYLE_DIM,
                              generator=torch.Generator().manual_seed(5))
    return unet, vae, styles


def _assert_weights_equal(loaded, original):
    expected = {k: v.half().float() for k, v in original.state_dict().items()}
    got = loaded.state_dict()
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert got[k].dtype == torch.float32, k
        assert torch.equal(got[k], v), k


# -- LiteAutoencoder -----------------------------------------------------------------------

def test_lite_autoencoder_contract():
    torch.manual_seed(0)
    vae = LiteAutoencoder(LiteAutoencoderConfig(latent_channels=LATENT, width=16)).eval()
    assert vae.latent_channels == LATENT
    images = torch.rand(2, 3, 48, 80)
    with torch.no_grad():
        z = vae.encode(images)
        assert z.shape == (2, LATENT, 6, 10)
        out = vae.decode(z * 50)  # large latents push the raw output out of [0, 1]
        raw = vae.decode_raw(z * 50)
    assert out.shape == raw.shape == (2, 3, 48, 80)
    assert out.min() >= 0 and out.max() <= 1
    assert (raw < 0).any() or (raw > 1).any()
    assert torch.equal(out, raw.clamp(0, 1))
    with pytest.raises(ValueError, match="50x64"):
        vae.encode(torch.rand(1, 3, 50, 64))


def test_lite_autoencoder_parameter_names_are_stable():
    # These names are the shipped weights' format: renaming a layer breaks every saved model.
    vae = LiteAutoencoder(LiteAutoencoderConfig(latent_channels=16, width=48))
    shapes = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert shapes["encoder.0.weight"] == (24, 3, 3, 3)
    assert shapes["encoder.4.conv.2.weight"] == (48, 48, 3, 3)
    assert shapes["encoder.8.weight"] == (16, 48, 3, 3)
    assert shapes["decoder.0.weight"] == (48, 16, 3, 3)
    assert shapes["decoder.9.weight"] == (24, 48, 3, 3)
    assert shapes["decoder.11.weight"] == (12, 24, 3, 3)
    assert len(shapes) == 2 * ((4 + 2 * 2) + (4 + 3 * 2))  # (convs + Res convs) x (weight, bias)


def test_lite_autoencoder_config_round_trip():
    config = LiteAutoencoderConfig(latent_channels=8, width=32)
    assert LiteAutoencoderConfig.from_diffusers(config.to_diffusers()) == config
    with pytest.raises(CheckpointError, match="AutoencoderTiny"):
        LiteAutoencoderConfig.from_diffusers({"_class_name": "AutoencoderTiny"})
    with pytest.raises(ValueError, match="width"):
        LiteAutoencoderConfig(width=15)


# -- StyleBank -----------------------------------------------------------------------------

def test_style_bank_context_and_blend():
    bank = StyleBank.random(["ink", "pastel", "neon"], tokens=3, dim=8, generator=torch.Generator().manual_seed(1))
    e = bank.embeddings.detach()
    assert bank.index("neon") == 2 and (bank.tokens, bank.dim, len(bank)) == (3, 8, 3)
    assert torch.equal(bank.context("pastel"), e[1:2])
    blend = bank.context({"ink": 1.0, "neon": 3.0})
    assert blend.shape == (1, 3, 8)
    torch.testing.assert_close(blend, (0.25 * e[0] + 0.75 * e[2])[None])
    torch.testing.assert_close(bank.context({"ink": 2.0}), e[:1])
    assert torch.equal(bank(torch.tensor([2, 0])), e[[2, 0]])


def test_style_bank_errors():
    bank = StyleBank.random(["ink", "pastel"], tokens=2, dim=4)
    with pytest.raises(LivestyleError, match="'sepia'.*ink, pastel"):
        bank.context("sepia")
    with pytest.raises(LivestyleError, match="'sepia'"):
        bank.context({"ink": 1.0, "sepia": 1.0})
    with pytest.raises(LivestyleError, match="weights"):
        bank.context({"ink": 1.0, "pastel": -2.0})
    with pytest.raises(LivestyleError, match="weights"):
        bank.context({"ink": 0.0})
    with pytest.raises(ValueError, match="repeated: ink"):
        StyleBank.random(["ink", "ink"])
    with pytest.raises(ValueError, match=r"\(2 styles, tokens, dim\), got shape \(3, 2, 4\)"):
        StyleBank(["ink", "pastel"], torch.zeros(3, 2, 4))


def test_style_bank_file_round_trip(tmp_path):
    bank = StyleBank.random(["ink", "pastel"], tokens=2, dim=4)
    bank.save(tmp_path / "s.safetensors")
    loaded = StyleBank.load(tmp_path / "s.safetensors")
    assert loaded.names == ("ink", "pastel")
    assert torch.equal(loaded.embeddings, bank.embeddings.detach())
    save_file({"embeddings": torch.zeros(2, 2, 4)}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(CheckpointError, match="names"):
        StyleBank.load(tmp_path / "bare.safetensors")
    save_file({"embeddings": torch.zeros(3, 2, 4)}, str(tmp_path / "three.safetensors"),
              metadata={"names": json.dumps(["a", "b"])})
    with pytest.raises(CheckpointError, match="3 embeddings"):
        StyleBank.load(tmp_path / "three.safetensors")


# -- The folder format ---------------------------------------------------------------------

def test_unet_config_to_diffusers_round_trips_and_matches_diffusers():
    config = demo_unet_config(LATENT, STYLE_DIM)
    cfg = unet_config_to_diffusers(config)
    assert UNetConfig.from_diffusers(json.loads(json.dumps(cfg))) == config
    torch.manual_seed(0)
    ours = perturb(UNet(config), 3)
    theirs = UNet2DConditionModel.from_config(cfg).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    g = torch.Generator().manual_seed(7)
    z, ctx = torch.randn(2, LATENT, 8, 12, generator=g), torch.randn(2, 3, STYLE_DIM, generator=g)
    t = torch.tensor([0.0, 375.5])
    with torch.no_grad():
        diff = (ours(z, t, ctx) - theirs(z, t, ctx).sample).abs().max()
    assert diff <= 1e-4


def test_save_and_load_demo_folder(tmp_path):
    unet, vae, styles = _parts()
    folder = save_demo_model(tmp_path / "demo", unet, vae, styles, schedule_extra={"default_strength": 0.8})
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "LivestyleDemoPipeline"
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "FlowBridgeScheduler" and sched["default_strength"] == 0.8

    pipe = load_pipeline(folder)
    assert pipe.family == "demo" and pipe.text is None and pipe.source == folder
    assert pipe.schedule.prediction_type == "flow_velocity" and pipe.schedule.num_train_timesteps == 1000
    assert isinstance(pipe.autoencoder, LiteAutoencoder) and pipe.autoencoder.config == vae.config
    assert pipe.unet.config == unet.config
    _assert_weights_equal(pipe.unet, unet)
    _assert_weights_equal(pipe.autoencoder, vae)
    assert pipe.styles.names == ("ink", "pastel", "neon")
    assert torch.equal(pipe.styles.embeddings, styles.embeddings.detach().half().float())
    assert not any(p.requires_grad for m in (pipe.unet, pipe.autoencoder, pipe.styles) for p in m.parameters())

    # The whole demo path: encode, one bridge step of the U-Net, decode.
    frames = torch.rand(2, 3, 32, 48)
    context = pipe.styles.context({"ink": 0.5, "neon": 0.5}).expand(2, -1, -1)
    with torch.no_grad():
        z0 = pipe.autoencoder.encode(frames)
        z1 = sample_bridge(lambda z, t: pipe.unet(z, t, context), z0, 0.7, steps=1)
        out = pipe.autoencoder.decode(z1)
    assert out.shape == frames.shape and not torch.equal(z1, z0)

    # Also recognised by its styles/ folder alone, and its vae/ on its own.
    (folder / "model_index.json").unlink()
    assert load_pipeline(folder, dtype=torch.float16).family == "demo"
    assert isinstance(load_autoencoder(folder / "vae"), LiteAutoencoder)


def test_demo_folder_errors(tmp_path):
    unet, vae, styles = _parts()
    with pytest.raises(ValueError, match="may not set prediction_type"):
        save_demo_model(tmp_path / "x", unet, vae, styles, schedule_extra={"prediction_type": "epsilon"})
    with pytest.raises(ValueError, match="8-d"):
        save_demo_model(tmp_path / "x", unet, vae, StyleBank.random(["a"], dim=8))
    assert not (tmp_path / "x").exists()

    folder = save_demo_model(tmp_path / "demo", unet, vae, styles)
    StyleBank.random(["a"], tokens=2, dim=8).save(folder / "styles" / "styles.safetensors")
    with pytest.raises(CheckpointError, match="16-d style context"):
        load_pipeline(folder)
    (folder / "styles" / "styles.safetensors").unlink()
    with pytest.raises(CheckpointError, match="styles.safetensors"):
        load_pipeline(folder)


def test_load_demo_missing_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "DEMO_MODEL", tmp_path / "nowhere")
    with pytest.raises(LivestyleError, match="demo model is missing"):
        demo.load_demo()


def test_noise_schedule_prediction_types():
    assert NoiseSchedule.from_diffusers({"prediction_type": "flow_velocity"}).prediction_type == "flow_velocity"
    with pytest.raises(CheckpointError, match="sample"):
        NoiseSchedule.from_diffusers({"prediction_type": "sample"})


def test_cli_inspect_demo_folder(tmp_path):
    folder = save_demo_model(tmp_path / "demo", *_parts())
    result = subprocess.run([sys.executable, "-m", "livestyle.cli", "inspect", str(folder)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "DEMO" in result.stdout and "styles" in result.stdout


# -- sample_bridge -------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_sample_bridge_constant_velocity(steps):
    g = torch.Generator().manual_seed(0)
    z0, c = torch.randn(3, 4, 5, 6, generator=g), torch.randn(3, 4, 5, 6, generator=g)
    calls = []

    def model(z, t):
        calls.append(t)
        return c

    out = sample_bridge(model, z0, 0.6, steps)
    torch.testing.assert_close(out, z0 + 0.6 * c, atol=1e-6, rtol=0)
    assert len(calls) == steps and calls[0].shape == (3,) and calls[0].dtype == torch.float32
    torch.testing.assert_close(torch.stack(calls)[:, 0], torch.arange(steps) * 600.0 / steps)

    strength = torch.tensor([0.0, 0.5, 1.0])
    out = sample_bridge(model, z0, strength, steps)
    torch.testing.assert_close(out, z0 + strength[:, None, None, None] * c, atol=1e-6, rtol=0)
    assert torch.equal(out[0], z0[0])


def test_sample_bridge_euler_and_strength_zero():
    z0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    # dz/dt = -z: Euler with n steps of dt gives z0 * (1 - dt)^n, so the model must see the stepped z.
    out = sample_bridge(lambda z, t: -z, z0, 0.8, steps=4)
    torch.testing.assert_close(out, z0 * (1 - 0.2) ** 4)
    assert sample_bridge(lambda z, t: pytest.fail("no model call at strength 0"), z0, 0.0, 3) is z0
    half = sample_bridge(lambda z, t: torch.ones_like(z), z0.half(), 0.5, steps=2)
    assert half.dtype == torch.float16
    torch.testing.assert_close(bridge_step(z0, torch.ones_like(z0), torch.tensor([0.1, 0.2]), 0.5),
                               z0 + torch.tensor([0.4, 0.3])[:, None, None, None])
    with pytest.raises(ValueError, match="steps"):
        sample_bridge(lambda z, t: z, z0, 0.5, steps=0)
    with pytest.raises(ValueError, match="strength"):
        sample_bridge(lambda z, t: z, z0, 1.5, steps=1)
