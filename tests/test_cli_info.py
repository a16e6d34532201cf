"""`livestyle info` and `livestyle presets`: what is installed, where things are looked for."""

import pytest

from livestyle import cli


@pytest.fixture
def homes(tmp_path, monkeypatch):
    """A fresh user config folder and models folder."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("LIVESTYLE_MODELS", str(tmp_path / "models"))
    presets = tmp_path / "config" / "livestyle" / "presets"
    presets.mkdir(parents=True)
    (tmp_path / "models" / "my-turbo").mkdir(parents=True)
    (tmp_path / "models" / "toon.safetensors").write_bytes(b"")
    return tmp_path


def test_info_lists_versions_devices_kernels_and_folders(homes, capsys):
    import torch

    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("livestyle", "python", "torch", "triton", "av", "aiortc", "opencv", "devices", "kernels",
                 "presets", "models", "demo model", "cameras", "vcam", "window"):
        assert any(line.startswith(name + " ") for line in out.splitlines()), name
    kernels = next(line for line in out.splitlines() if line.startswith("kernels"))
    assert ("Triton" in kernels) if torch.cuda.is_available() else ("torch reference (no CUDA" in kernels)
    models = next(line for line in out.splitlines() if line.startswith("models"))
    assert str(homes / "models") in models and "$LIVESTYLE_MODELS" in models and "my-turbo, toon" in models
    assert str(homes / "config" / "livestyle" / "presets") in out
    assert "weights/demo" in out.replace("\\", "/")


def test_presets_lists_builtin_and_user_ones_and_flags_broken_files(homes, capsys):
    folder = homes / "config" / "livestyle" / "presets"
    (folder / "mine.toml").write_text('description = "Mine"\nstyle = "ink-sketch"\nstrength = 0.5\n')
    (folder / "broken.toml").write_text('style = "ink-sketch"\nstrenght = 0.5\n')
    assert cli.main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in lines}
    assert {"starry-night", "ink-sketch", "mine", "broken"} <= set(rows)
    assert "built-in" in rows["starry-night"] and "user" in rows["mine"] and "Mine" in rows["mine"]
    assert "broken: " in rows["broken"] and "unknown key 'strenght'" in rows["broken"]


def test_presets_show_prints_the_file(homes, capsys):
    assert cli.main(["presets", "show", "ink-sketch"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# ink-sketch (built-in: ") and 'style = "ink-sketch"' in out


def test_presets_show_unknown_or_broken_is_one_line(homes, capsys):
    assert cli.main(["presets", "show", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("livestyle: error: unknown preset 'nope' (known: ") and "\n" not in err
    bad = homes / "bad.toml"
    bad.write_text('style = "ink-sketch"\nsteps = 9\n')
    assert cli.main(["presets", "show", str(bad)]) == 2
    assert capsys.readouterr().err.strip() == f"livestyle: error: {bad}: steps = 9 is outside 1 to 4"
