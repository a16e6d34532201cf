"""Reduced precision and the run summary: bf16 on the CPU end to end against fp32 (how CI
exercises the half-precision path without a GPU), the engine's host time per frame in
stats() and in `livestyle run`'s summary, --cuda-graphs refused on a CPU in one line, and
the CLI's numerics settings leaving a CPU run as it was."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from livestyle import cli
from livestyle.config import StreamSettings
from livestyle.models.demo import load_demo
from livestyle.stream import precision
from livestyle.stream.engine import Engine

sys.path.insert(0, str(Path(__file__).parent))
from test_engine_step import SIZE, run_case  # noqa: E402
from tiny_pipelines import tiny_sd_pipeline  # noqa: E402


@pytest.mark.parametrize("load,settings", [
    (load_demo, StreamSettings(size=SIZE, style="ink-sketch", steps=2)),
    (tiny_sd_pipeline, StreamSettings(size=SIZE, prompt="a fox", steps=2, guidance="self", guidance_scale=1.5)),
], ids=["demo", "tiny-sd-rcfg"])
def test_bf16_on_the_cpu_is_within_a_few_grey_levels_of_fp32(load, settings):
    """Temporal parts on (cache, flow, output blend): 6 frames through the stream batch.
    Measured here: mean 0.38 / max 3 grey levels (demo), 0.25 / 4 (tiny SD); the bounds
    leave room for other CPUs' bf16 matmuls (oneDNN rounds differently per ISA)."""
    outputs = {}
    for dtype in (torch.float32, torch.bfloat16):
        with Engine(load, dtype=dtype) as engine:
            outputs[dtype] = run_case(engine, [(settings, "coffee")]).astype(np.int16)
    error = np.abs(outputs[torch.float32] - outputs[torch.bfloat16])
    assert error.mean() <= 1.0 and error.max() <= 12, (error.mean(), error.max())


def test_host_time_per_frame_is_measured(engine):
    run_case(engine, [(StreamSettings(size=SIZE, style="ink-sketch"), "coffee")])
    stats = engine.stats()
    assert 0 < stats["host_ms"] < 10_000 and 0 < stats["host_ms_mean"] < 10_000
    assert stats["compiles"] == 0 and stats["captures"] == 0


def test_run_prints_the_host_time_per_frame(tmp_path, capsys):
    code = cli.main(["run", "test:", "-o", str(tmp_path / "out.mp4"), "--seconds", "0.25", "--size", "64x64"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert " ms/frame, host " in out
    host = float(out.split(" ms/frame, host ")[1].split(" ms/frame")[0])
    assert host > 0


def test_cuda_graphs_on_a_cpu_are_refused_in_one_line(tmp_path, capsys):
    code = cli.main(["run", "test:", "-o", str(tmp_path / "out.mp4"), "--device", "cpu", "--cuda-graphs"])
    _, err = capsys.readouterr()
    assert code == 2 and err.strip() == "livestyle: error: --cuda-graphs: CUDA graphs need a CUDA device, not cpu"
    assert not (tmp_path / "out.mp4").exists()


def test_numerics_on_a_cpu_change_nothing():
    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark)
    assert precision.configure("cpu", torch.bfloat16) is False
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark) == before
