"""Presets: the built-in ones load, and bad files name the file, the key and what is allowed."""

import pytest

from livestyle.config import DEFAULT_PRESET, PresetError, find_preset, load_preset, preset_files


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
