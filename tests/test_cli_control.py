"""ControlNets from the command line: `--control INPUT=NET[@SCALE]` on run and serve, its
errors (argparse's one line, exit 2), presets' [[control]] tables reaching the stream, and
`livestyle run` end to end with tiny random checkpoints saved by diffusers: an SD 1.x
folder with a ControlNet made from its U-Net, and an SD 1.x ControlNet refused by an SDXL
checkpoint in one line."""

import argparse

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from media_clips import make_clip, video_facts

from livestyle import cli
from livestyle.config import Control, find_preset
from random_weights import perturb


def parse(*argv):
    return cli.build_parser().parse_args(["run", "test:", *argv])


@pytest.mark.parametrize("text, control", [
    ("canny=cn-canny", Control("cn-canny", "canny", 1.0)),
    ("canny=~/models/cn-canny@0.8", Control("~/models/cn-canny", "canny", 0.8)),
    ("temporalnet=/nets/tn.safetensors@0", Control("/nets/tn.safetensors", "temporalnet", 0.0)),
    ("soft_edges=cn@2", Control("cn", "soft_edges", 2.0)),
    ("depth:midas=cn-depth@1.5", Control("cn-depth", "depth:midas", 1.5)),
    ("canny=/nets/v@2/cn", Control("/nets/v@2/cn", "canny", 1.0)),  # an @ inside a path is the path's
    ("canny=a@b@0.5", Control("a@b", "canny", 0.5)),
])
def test_control_option(text, control):
    assert cli.control(text) == control


def test_controls_are_repeatable_and_replace_the_presets():
    args = parse("--control", "canny=cn-canny@0.8", "--control", "temporalnet=cn-tn")
    preset = find_preset("starry-night")
    settings = cli._settings(args, preset, (64, 48))
    assert settings.controls == (Control("cn-canny", "canny", 0.8), Control("cn-tn", "temporalnet"))
    assert cli._settings(parse(), preset, (64, 48)).controls == ()
    serve = cli.build_parser().parse_args(["serve", "--control", "soft_edges=cn@0.3"])
    assert serve.control == [Control("cn", "soft_edges", 0.3)]


@pytest.mark.parametrize("text, message", [
    ("cn-canny", "is not INPUT=NET[@SCALE]"),
    ("=cn-canny", "is not INPUT=NET[@SCALE]"),
    ("canny=", "is not INPUT=NET[@SCALE]"),
    ("canny=cn@high", "scale 'high' is not a number"),
    ("canny=cn@3", "control scale = 3.0: must be 0 to 2"),
    ("canny=cn@-0.5", "control scale = -0.5: must be 0 to 2"),
    ("canny=cn@nan", "scale = nan: must be a finite number"),
    ("edges=cn", "control input = 'edges': must be one of canny, soft_edges, temporalnet or depth:NAME"),
    ("depth:=cn", "control input = 'depth:'"),
    ("canny=@0.5", "control net: empty"),
])
def test_bad_control_options_are_one_argparse_line(text, message, capsys):
    with pytest.raises(argparse.ArgumentTypeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        cli.control(text)
    for command in (["run", "test:"], ["serve"]):
        with pytest.raises(SystemExit) as exited:
            cli.main([*command, "--control", text])
        assert exited.value.code == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith(f"livestyle {command[0]}: error: argument --control: control {text!r}") \
            and message in last


def test_more_controls_than_the_engine_takes_is_one_line(capsys):
    argv = ["run", "test:", "--model", "demo"] + [a for i in range(5) for a in ("--control", f"canny=cn{i}")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip() == "livestyle: error: controls: 5 ControlNets (at most 4)"


@pytest.mark.parametrize("command", ["run", "serve"])
def test_the_demo_model_takes_no_controlnets(command, tmp_path, capsys):
    argv = [command] + (["test:", "-o", str(tmp_path / "out.mp4")] if command == "run" else ["--port", "0"])
    assert cli.main(argv + ["--model", "demo", "--control", "canny=cn-canny"]) == 2
    out, err = capsys.readouterr()
    assert err.strip() == f"livestyle: error: {cli.NO_DEMO_CONTROLS}" and not list(tmp_path.iterdir())


def test_the_summary_names_each_control_without_its_folder():
    settings = cli._settings(parse("--control", "canny=/home/me/nets/cn-canny@0.8"), find_preset("starry-night"),
                             (64, 48))
    assert cli._describe("p", "sd1", "cpu", settings).endswith(", ControlNet canny cn-canny at 0.8")


def test_presets_count_their_controlnets(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    folder = tmp_path / "livestyle" / "presets"
    folder.mkdir(parents=True)
    (folder / "edges.toml").write_text('model = "sd-turbo"\nprompt = "ink"\n[[control]]\nnet = "a"\n'
                                       '[[control]]\nnet = "b"\ninput = "temporalnet"\n')
    assert cli.main(["presets"]) == 0
    row = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("edges "))
    assert "prompt 'ink', 2 ControlNets;" in row


def test_info_lists_controlnets_apart_from_models(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LIVESTYLE_MODELS", str(tmp_path))
    (tmp_path / "sd-turbo").mkdir()
    (tmp_path / "cn-canny").mkdir()
    (tmp_path / "cn-canny" / "config.json").write_text('{"_class_name": "ControlNetModel"}')
    assert cli.main(["info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert next(x for x in lines if x.startswith("models ")).endswith(": sd-turbo")
    assert next(x for x in lines if x.startswith("controlnets ")) == \
        "controlnets  cn-canny (there too: --control INPUT=NAME)"


# -- End to end ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd_with_controlnet(tmp_path_factory):
    """A tiny SD 1.x diffusers folder (test_cli_sd's) and a ControlNet made from its U-Net."""
    from test_cli_sd import write_tiny_sd

    root = tmp_path_factory.mktemp("sd-cn")
    torch.manual_seed(0)
    unet = write_tiny_sd(root)
    perturb(ControlNetModel.from_unet(unet), 4, scale=0.1).save_pretrained(root / "cn-canny", safe_serialization=True)
    return root


def test_run_with_a_controlnet(sd_with_controlnet, tmp_path, capsys):
    root = sd_with_controlnet
    clip = make_clip(tmp_path / "in.mp4", size=(80, 64), frames=6)
    out = tmp_path / "out.mp4"
    code = cli.main(["run", str(clip), "-o", str(out), "--model", str(root / "model"), "--prompt", "an ink drawing",
                     "--size", "64x48", "--steps", "2", "--control", f"canny={root / 'cn-canny'}@0.8",
                     "--control", f"temporalnet={root / 'cn-canny'}@0.5"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert "restyled 6 frames" in stdout and "ControlNet canny cn-canny at 0.8, temporalnet cn-canny#2 at 0.5" in stdout
    facts = video_facts(out)
    assert facts["frames"] == 6 and facts["size"] == (80, 64)


def test_a_preset_with_a_controlnet_by_name(sd_with_controlnet, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LIVESTYLE_MODELS", str(sd_with_controlnet))  # nets are found by name as models are
    preset = tmp_path / "edges.toml"
    preset.write_text('model = "model"\nprompt = "an ink drawing"\n\n'
                      '[[control]]\nnet = "cn-canny"\ninput = "soft_edges"\nscale = 0.7\nend = 0.5\n')
    out = tmp_path / "out.mp4"
    code = cli.main(["run", str(make_clip(tmp_path / "in.mp4", size=(64, 48), frames=3)), "-o", str(out),
                     "--preset", str(preset), "--size", "64x48"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert "ControlNet soft_edges cn-canny at 0.7" in stdout and video_facts(out)["frames"] == 3


def test_a_missing_controlnet_is_one_line(sd_with_controlnet, tmp_path, capsys):
    root = sd_with_controlnet
    out = tmp_path / "out.mp4"
    code = cli.main(["run", str(make_clip(tmp_path / "in.mp4", frames=2)), "-o", str(out), "--model",
                     str(root / "model"), "--prompt", "a fox", "--size", "64x48", "--control",
                     f"canny={tmp_path / 'no-such-net'}"])
    err = capsys.readouterr().err
    assert code != 0 and "no-such-net" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


@pytest.fixture(scope="module")
def sdxl_with_controlnet(tmp_path_factory):
    """test_sdxl_pipeline's tiny SDXL pipeline saved by diffusers, a ControlNet made from its
    U-Net, and an SD 1.5-shaped one (test_controlnet's)."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline

    from test_controlnet import SD_TINY
    from test_sdxl_pipeline import components, tokenizers

    root = tmp_path_factory.mktemp("sdxl-cn")
    unet, vae, text, text_2 = components()
    tok, tok_2 = tokenizers(root / "tok")
    StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tok, tokenizer_2=tok_2,
                              unet=unet, scheduler=EulerAncestralDiscreteScheduler(timestep_spacing="trailing")
                              ).save_pretrained(root / "sdxl")
    perturb(ControlNetModel.from_unet(unet), 5, scale=0.1).save_pretrained(root / "xl-canny")
    torch.manual_seed(0)
    ControlNetModel.from_unet(UNet2DConditionModel(**SD_TINY)).save_pretrained(root / "sd15-canny")
    return root


def test_run_sdxl_with_a_controlnet(sdxl_with_controlnet, tmp_path, capsys):
    root = sdxl_with_controlnet
    capsys.readouterr()  # diffusers' progress bars
    out = tmp_path / "out.mp4"
    code = cli.main(["run", str(make_clip(tmp_path / "in.mp4", size=(80, 64), frames=3)), "-o", str(out),
                     "--model", str(root / "sdxl"), "--prompt", "a fox", "--control", f"canny={root / 'xl-canny'}@0.6"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert "sdxl model" in stdout and "at 80x64" in stdout and "ControlNet canny xl-canny at 0.6" in stdout
    assert video_facts(out)["frames"] == 3


def test_an_sd15_controlnet_with_an_sdxl_checkpoint_is_one_line(sdxl_with_controlnet, tmp_path, capsys):
    root = sdxl_with_controlnet
    capsys.readouterr()
    out = tmp_path / "out.mp4"
    code = cli.main(["run", str(make_clip(tmp_path / "in.mp4", frames=2)), "-o", str(out), "--model",
                     str(root / "sdxl"), "--prompt", "a fox", "--size", "64x48", "--control",
                     f"canny={root / 'sd15-canny'}"])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "sd15-canny" in err and "the ControlNet is for SD 1.x, the U-Net is an SDXL" in err
    assert not out.exists()


@pytest.mark.parametrize("given", ["--control", "[[control]]"])
def test_serve_refuses_a_missing_controlnet_before_serving(sd_with_controlnet, tmp_path, capsys, given):
    preset = tmp_path / "fox.toml"
    missing = tmp_path / "no-such-net"
    preset.write_text(f'model = "{sd_with_controlnet / "model"}"\nprompt = "a fox"\n'
                      + (f'[[control]]\nnet = "{missing}"\n' if given == "[[control]]" else ""))
    code = cli.main(["serve", "--port", "0", "--preset", str(preset), "--short-side", "64"]
                    + (["--control", f"canny={missing}"] if given == "--control" else []))
    out, err = capsys.readouterr()
    assert code != 0 and "no-such-net" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "livestyle serve:" not in out  # it never listened
