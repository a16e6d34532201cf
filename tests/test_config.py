"""Presets: the built-in ones load, and bad files name the file, the key and what is allowed."""

import pytest

from livestyle.config import (
    BUILTIN_PRESETS, DEFAULT_PRESET, Control, PresetError, StreamSettings, find_model, find_preset, load_preset,
    model_names, models_dir, preset_files, preset_origin, user_preset_dir,
)
from livestyle.errors import LivestyleError


def test_builtin_presets_load():
    files = preset_files()
    assert DEFAULT_PRESET in files
    assert len([n for n in files if find_preset(n).model == "demo"]) >= 4
    for name in files:
        preset = find_preset(name)
        assert preset.name == name and preset.description


@pytest.mark.parametrize("text, message", [
    ('style = "x"\ncolour = "red"\n', "unknown key 'colour' (allowed: name, description"),
    ('style = "x"\nstrength = 1.5\n', "strength = 1.5 is outside 0 to 1"),
    ('style = "x"\nsteps = "two"\n', "steps = 'two' is not a int"),
    ('style = "x"\nsteps = 9\n', "steps = 9 is outside 1 to 4"),
    ('style = "x"\ntemporal = 1\n', "temporal = 1 is not a bool"),
    ('strength = 0.5\n', "a preset for the demo model needs a style"),
    ('style = "x\n', "not valid TOML"),
])
def test_bad_preset_values(tmp_path, text, message):
    path = tmp_path / "mine.toml"
    path.write_text(text)
    with pytest.raises(PresetError, match="mine.toml: " + message.replace("(", r"\(").replace(")", r"\)")):
        load_preset(path)


def test_integers_are_fine_where_floats_are_expected(tmp_path):
    path = tmp_path / "whole.toml"
    path.write_text('style = "ink-sketch"\nstrength = 1\n')
    assert load_preset(path).strength == 1.0


def test_user_preset_dir_and_unknown_name(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    (tmp_path / "livestyle" / "presets").mkdir(parents=True)
    (tmp_path / "livestyle" / "presets" / "mine.toml").write_text('style = "ink-sketch"\nstrength = 0.4\n')
    assert find_preset("mine").strength == 0.4
    with pytest.raises(PresetError, match="unknown preset 'nope' \\(known: .*mine"):
        find_preset("nope")


def test_models_by_path_or_by_name_under_livestyle_models(tmp_path, monkeypatch):
    monkeypatch.setenv("LIVESTYLE_MODELS", str(tmp_path / "models"))
    (tmp_path / "models" / "sd-turbo").mkdir(parents=True)
    (tmp_path / "models" / "dreamshaper.safetensors").write_bytes(b"")
    (tmp_path / "models" / "notes.txt").write_text("")
    elsewhere = tmp_path / "other.safetensors"
    elsewhere.write_bytes(b"")
    assert models_dir() == tmp_path / "models" and model_names() == ["dreamshaper", "sd-turbo"]
    assert find_model("sd-turbo") == tmp_path / "models" / "sd-turbo"
    assert find_model("dreamshaper") == tmp_path / "models" / "dreamshaper.safetensors"
    assert find_model(str(elsewhere)) == elsewhere
    with pytest.raises(LivestyleError, match=r"model 'nope': no such file or folder, nor a model of that name in "
                                             r".*models \(found there: dreamshaper, sd-turbo; set LIVESTYLE_MODELS"):
        find_model("nope")


def test_models_dir_defaults_to_xdg_data(tmp_path, monkeypatch):
    monkeypatch.delenv("LIVESTYLE_MODELS", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert models_dir() == tmp_path / "livestyle" / "models"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert models_dir() == tmp_path / ".local" / "share" / "livestyle" / "models"


def test_preset_origin(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert preset_origin(BUILTIN_PRESETS / "ink-sketch.toml") == "built-in"
    assert preset_origin(user_preset_dir() / "mine.toml") == "user"
    assert preset_origin(tmp_path / "x" / "look.toml") == str(tmp_path / "x")


SD_LOOK = 'model = "sd-turbo"\nprompt = "an ink drawing"\n'


def test_control_tables(tmp_path):
    path = tmp_path / "edges.toml"
    path.write_text(SD_LOOK + '[[control]]\nnet = "cn-canny"\nscale = 1\n\n'
                    '[[control]]\nnet = "~/nets/temporal.safetensors"\ninput = "temporalnet"\nscale = 0.4\n'
                    'start = 0\nend = 0.5\n')
    preset = load_preset(path)
    assert preset.controls == (Control("cn-canny", "canny", 1.0),
                               Control("~/nets/temporal.safetensors", "temporalnet", 0.4, 0.0, 0.5))
    settings = StreamSettings.from_preset(preset, (64, 48))
    assert settings.controls == preset.controls
    assert StreamSettings.from_preset(preset, (64, 48), controls=()).controls == ()
    assert load_preset(BUILTIN_PRESETS / f"{DEFAULT_PRESET}.toml").controls == ()


@pytest.mark.parametrize("text, message", [
    ('[[control]]\nnet = "cn"\nweight = 1\n', "[[control]] 1: unknown key 'weight' (allowed: net, input, scale, start, end)"),
    ('[[control]]\nnet = "cn"\n[[control]]\nnet = "cn"\nscale = "high"\n', "[[control]] 2: scale = 'high' is not a float"),
    ('[[control]]\nnet = "cn"\nscale = 2.5\n', "[[control]] 1: control scale = 2.5: must be 0 to 2"),
    ('[[control]]\nnet = "cn"\nstart = 0.6\nend = 0.5\n', "[[control]] 1: control start = 0.6, end = 0.5"),
    ('[[control]]\nnet = "cn"\ninput = "depth"\n', "[[control]] 1: control input = 'depth': must be one of"),
    ('[[control]]\nnet = 7\n', "[[control]] 1: net = 7 is not a str"),
    ('[[control]]\ninput = "canny"\n', "[[control]] 1: no net"),
    ('control = "cn-canny"\n', "control must be [[control]] tables"),
    ('[control]\nnet = "cn"\n', "control must be [[control]] tables"),
    ('[[control]]\nnet = "cn"\n' * 5, "5 [[control]] tables (at most 4)"),
])
def test_bad_control_tables(tmp_path, text, message):
    path = tmp_path / "mine.toml"
    path.write_text(SD_LOOK + text)
    with pytest.raises(PresetError) as caught:
        load_preset(path)
    assert str(caught.value).startswith(f"{path}: {message}") and "\n" not in str(caught.value)


def test_a_demo_preset_with_controls_is_refused(tmp_path):
    path = tmp_path / "demo.toml"
    path.write_text('style = "ink-sketch"\n[[control]]\nnet = "cn-canny"\n')
    with pytest.raises(PresetError, match="demo.toml: the demo model has no ControlNets"):
        load_preset(path)
