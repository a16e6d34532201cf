"""Bad checkpoints give one clear line, from the library and from the CLI."""

import json
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from livestyle.errors import CheckpointError
from livestyle.models.checkpoint import describe, read_header, read_safetensors


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "livestyle.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def _assert_one_line_error(result, *words):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture
def small_file(tmp_path):
    path = tmp_path / "small.safetensors"
    save_file({"a": torch.randn(64, 64), "b": torch.zeros(3)}, str(path))
    return path


def test_header_lists_tensors(small_file):
    infos = read_header(small_file)
    assert infos["a"].shape == (64, 64) and infos["a"].dtype == "F32"
    assert torch.equal(read_safetensors(small_file)["b"], torch.zeros(3))


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickle_suffix_refused_with_conversion_hint(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    with pytest.raises(CheckpointError, match="pickle checkpoint.*safetensors.*save_file"):
        read_safetensors(path)


def test_pickle_renamed_to_safetensors_refused(tmp_path):
    path = tmp_path / "sneaky.safetensors"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="pickle checkpoint"):
        read_header(path)


def test_truncated_file(small_file):
    data = small_file.read_bytes()
    small_file.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        read_safetensors(small_file)


def test_truncated_inside_header(small_file):
    small_file.write_bytes(small_file.read_bytes()[:20])
    with pytest.raises(CheckpointError, match="truncated"):
        read_header(small_file)


@pytest.mark.parametrize("content, message", [(b"", "empty file"), (b"hello, this is text\n" * 3, "not a safetensors")])
def test_not_safetensors(tmp_path, content, message):
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        read_header(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        read_header(tmp_path / "nope.safetensors")


def test_describe():
    assert "SDXL" in describe({"conditioner.embedders.0.transformer.x": 0, "model.diffusion_model.x": 0})
    assert "SDXL" in describe({"model.diffusion_model.label_emb.0.0.weight": 0})
    assert "LoRA" in describe({"lora_unet_down_blocks_0_x.lora_down.weight": 0})
    assert "original SD layout" in describe({"input_blocks.0.0.weight": 0})
    assert "unrecognised" in describe({"foo.bar": 0})


def _sdxl_file(tmp_path):
    path = tmp_path / "sdxl.safetensors"
    save_file({
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
        "model.diffusion_model.label_emb.0.0.weight": torch.zeros(1280, 2816),
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(768),
        "conditioner.embedders.1.model.ln_final.weight": torch.zeros(1280),
    }, str(path))
    return path


def test_partial_sdxl_file_named(tmp_path):
    from livestyle.models import load_pipeline, load_unet

    path = _sdxl_file(tmp_path)  # SDXL loads (test_sdxl_pipeline.py); this one lacks most weights
    with pytest.raises(CheckpointError, match=r"has no VAE \(first_stage_model"):
        load_pipeline(path)
    with pytest.raises(CheckpointError, match="no out.2.weight"):
        load_unet(path)


def test_folder_without_unet(tmp_path):
    from livestyle.models import load_pipeline

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (tmp_path / "vae").mkdir()
    (tmp_path / "text_encoder").mkdir()
    with pytest.raises(CheckpointError, match=r"without unet/ \(found: text_encoder, vae\)"):
        load_pipeline(tmp_path)


def test_folder_that_is_no_model(tmp_path):
    from livestyle.models import load_pipeline

    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="not a diffusers model folder"):
        load_pipeline(tmp_path)


def test_cli_bad_inputs(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, ckpt)
    _assert_one_line_error(_cli("inspect", ckpt), "model.ckpt", "pickle checkpoint", "safetensors")

    trunc = tmp_path / "trunc.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}, str(trunc))
    trunc.write_bytes(trunc.read_bytes()[:-1000])
    _assert_one_line_error(_cli("inspect", trunc), "trunc.safetensors", "truncated")

    _assert_one_line_error(_cli("inspect", _sdxl_file(tmp_path)), "sdxl.safetensors", "has no VAE")

    folder = tmp_path / "pipe"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    (folder / "vae").mkdir()
    _assert_one_line_error(_cli("inspect", folder), "without unet/")

    _assert_one_line_error(_cli("inspect", tmp_path / "missing.safetensors"), "no such file")


@pytest.mark.parametrize("change, message", [
    (lambda e: e.update(data_offsets=["0", "32"]), "must be a string and non-negative integers"),
    (lambda e: e.update(shape="2x4"), "must be a string and non-negative integers"),
    (lambda e: e.update(data_offsets=[32, 0]), "must be a string and non-negative integers"),
    (lambda e: e.update(dtype=7), "must be a string and non-negative integers"),
    (lambda e: e.update(data_offsets=[0, 10**12], shape=[10**12 // 4]), "truncated"),
])
def test_header_values_of_the_wrong_type_are_one_line(tmp_path, change, message):
    """Offsets, shapes and dtypes are JSON: strings, reversed or absurd values are refused
    by read_header with one line, before any arithmetic on them."""
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(2, 4)}, str(path))
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    change(header["w"])
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])
    with pytest.raises(CheckpointError, match=message) as caught:
        read_header(path)
    assert "\n" not in str(caught.value)
