"""The benchmarks cannot rot: device_check.sh's CPU smoke mode and `livestyle bench --smoke` run here."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from livestyle import cli

ROOT = Path(__file__).resolve().parents[1]


def test_device_check_smoke_leaves_one_json_and_one_log(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh"), "--smoke", str(tmp_path)],
                            capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["device_check.json", "device_check.log"]
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert result.returncode == 0, (tmp_path / "device_check.log").read_text()[-3000:]
    assert [s["name"] for s in report["steps"]] == ["environment", "kernels", "bench", "sdxl"]
    assert all(s["status"] == "ok" for s in report["steps"])
    rows = report["bench"]["rows"]
    assert {r["section"] for r in rows} == {"unet", "frame", "demo", "temporal", "roofline"}
    assert not report["bench"]["meta"]["failed_sections"]
    # Every CPU row is a measurement; every GPU row says so instead of a number.
    frames = [r for r in rows if r["section"] == "frame" and "fps" in r]
    assert {r["system"] for r in frames} >= {"livestyle", "diffusers img2img"}
    assert all(r["fps"]["median"] > 0 for r in frames)
    unet = [r for r in rows if r["section"] == "unet" and "faults_per_call" in r]
    assert len(unet) == 12  # 3 U-Nets (livestyle, livestyle packed, diffusers) x main/worker thread x 2 allocators
    gpu = [r for r in rows if "cuda" in r["configuration"]]
    assert gpu and all(r["note"] == "not measured (no CUDA)" for r in gpu)
    assert report["kernels"] is not None
    # The roofline counts the engine's packed U-Net (the frame section packed it in place) too.
    roofline = [r for r in rows if r["section"] == "roofline"]
    assert len(roofline) == 2 and all(r["gflop_per_frame"] > 0 and r["achieved_tflops"] > 0 for r in roofline)
    # Stream batch: S - 1 frames of latency (the bench leaves them in flight between rounds).
    batched = {r["system"]: r for r in frames if "stream batch" in r["configuration"]}
    assert batched["livestyle"]["latency_frames"] == 1
    temporal = {r["configuration"] for r in rows if r["section"] == "temporal"}
    assert "64x64, all off" in temporal and "64x64, all on (default)" in temporal
    # SDXL-Turbo's architecture, tiny: both U-Nets (the same tensors, the same output) and the engine's frame.
    assert not report["sdxl"]["meta"]["failed_sections"]
    sdxl = {(r["configuration"], r["system"]): r for r in report["sdxl"]["rows"]}
    unet = "U-Net step, fp32, cpu, 64x64, batch 1, main thread"
    assert sdxl[(unet, "livestyle")]["ms"]["median"] > 0 and sdxl[(unet, "diffusers")]["ms"]["median"] > 0
    assert sdxl[(unet, "livestyle")]["max_abs_diff_vs_diffusers"] <= 1e-4
    assert sdxl[(unet, "livestyle")]["gflop_per_call"] == sdxl[(unet, "diffusers")]["gflop_per_call"] > 0
    frame = "frame, fp32, cpu, 64x64, 1 step, batch 1"
    assert sdxl[(frame, "livestyle")]["fps"]["median"] > 0
    assert sdxl[(frame, "livestyle, all temporal parts")]["fps"]["median"] > 0
    assert [r["note"] for r in report["sdxl"]["rows"] if "cuda" in r["configuration"]] == ["not measured (no CUDA)"]


def test_livestyle_bench_writes_json_markdown_and_says_what_of_the_plot(tmp_path):
    out = tmp_path / "bench"
    result = subprocess.run([sys.executable, "-m", "livestyle.cli", "bench", "--smoke", "--sections",
                             "contention", "--json", f"{out}.json", "--markdown", f"{out}.md", "--plot",
                             f"{out}.png", "--threads", "1", "--kernels", "torch"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(Path(f"{out}.json").read_text())
    assert report["meta"]["threads"].startswith("1 torch threads")
    contention = [r for r in report["rows"] if r["section"] == "contention"]
    assert [r["system"] for r in contention] == ["quiet", "one busy process"] * 2
    assert all(r["fps"]["median"] > 0 for r in contention)
    table = Path(f"{out}.md").read_text()
    assert "| configuration | system | figures |" in table and "torch 2." in table
    # The plot has no frame rows to draw here: it says so rather than drawing an empty one.
    assert "no plot:" in result.stdout and not Path(f"{out}.png").exists()


def test_sdxl_on_a_cpu_without_full_says_why_it_is_not_run(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("with CUDA the SDXL rows are measured, not skipped")
    assert cli.main(["bench", "--sections", "sdxl", "--json", str(tmp_path / "b.json")]) == 0
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [(r["section"], r["note"].split(":")[0]) for r in rows] == [("sdxl", "not run without --full"),
                                                                       ("sdxl", "not measured (no CUDA)")]
    assert "2.6 billion parameters" in rows[0]["note"] and "512x512" in rows[0]["configuration"]


def test_bench_refuses_bad_values_in_one_line(capsys):
    try:
        cli.main(["bench", "--rounds", "0"])
    except SystemExit as e:
        assert e.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "livestyle bench: error: argument --rounds: 0: must be 1 to 1000"


def test_bench_without_a_checkout_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "BENCHMARKS", tmp_path / "benchmarks")
    assert cli.main(["bench", "--json", "x.json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"livestyle: error: livestyle bench needs a source checkout's benchmarks/ (pip install -e . "
                   f"from a clone); there is none at {tmp_path / 'benchmarks'}"]


def test_bench_refuses_triton_kernels_where_they_cannot_run(monkeypatch, capsys):
    import torch

    from livestyle import kernels

    if torch.cuda.is_available() or kernels.interpreted():
        pytest.skip("Triton can run here (CUDA or the interpreter): nothing to refuse")
    monkeypatch.setattr(kernels, "_backend", None)  # the refused choice must not leak into later tests
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert cli.main(["bench", "--smoke", "--sections", "roofline", "--kernels", "triton"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("livestyle: error: --kernels triton: ")


def test_demo_speed_times_two_models_in_turn_end_to_end(capsys):
    from benchmarks import demo_speed

    demo = ROOT / "livestyle" / "weights" / "demo"
    assert demo_speed.main(["--model", str(demo), "--model", str(demo), "--sizes", "64", "--steps", "1",
                            "--runs", "2", "--threads", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| demo | 64x64 | 1 |")]
    assert len(rows) == 4  # two models, temporal cache off and on
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        end_to_end, fps = float(cells[7].split()[0]), float(cells[8])
        assert end_to_end > 0 and abs(fps * end_to_end / 1e3 - 1) < 0.02  # fps from the end-to-end median


def test_demo_speed_refuses_a_folder_that_is_not_a_model_in_one_line(tmp_path, capsys):
    from benchmarks import demo_speed

    assert demo_speed.main(["--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("demo_speed: error: ") and "missing" in err[0]


def test_temporal_quality_measures_another_model_and_refuses_bad_ones(tmp_path, capsys):
    from benchmarks import temporal_quality

    demo = ROOT / "livestyle" / "weights" / "demo"
    assert temporal_quality.main(["--model", str(demo), "--size", "64", "--clips", "1", "--frames", "3",
                                  "--styles", "ink-sketch", "--threads", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| all ")]
    assert len(rows) == 3 and rows[0].split("|")[5].strip() == "1.00"  # all off's sharpness over its own
    assert all(0 < float(row.split("|")[5]) < 1.5 for row in rows[1:])  # bilinear, then bicubic warps
    assert temporal_quality.main(["--model", str(tmp_path / "missing")]) == 2
    assert temporal_quality.main(["--model", str(demo), "--styles", "mona-lisa"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("temporal_quality: error: ") for line in err)
    assert "missing" in err[0] and "'mona-lisa'" in err[1]


def test_blend_resampling_keeps_a_still_texture_and_blurs_a_moving_one_less_with_bicubic():
    import cv2
    import numpy as np
    from benchmarks import blend_resampling
    from training.data import load_image

    photo = load_image("coffee").astype(np.float32) / 255
    x = np.arange(64, dtype=np.float32)
    still = np.stack([photo[150:214, 200:264]] * 8)
    zero = np.zeros((7, 64, 64, 2), np.float32)
    assert blend_resampling.blended_sharpness(still, zero, 0.5, cv2.INTER_LINEAR) == pytest.approx(1.0)
    # A diagonal pan of (0.37, 0.22) px per frame, rendered bilinearly as the clips are; the flow points back.
    frames = np.stack([cv2.remap(photo, *np.meshgrid(x + 200 + 0.37 * t, x + 150 + 0.222 * t), cv2.INTER_LINEAR)
                       for t in range(8)])
    back = np.zeros((7, 64, 64, 2), np.float32)
    back[..., 0], back[..., 1] = -0.37, -0.222
    bilinear = blend_resampling.blended_sharpness(frames, back, 0.5, cv2.INTER_LINEAR)
    bicubic = blend_resampling.blended_sharpness(frames, back, 0.5, cv2.INTER_CUBIC)
    assert bilinear < 0.7 and bicubic > bilinear + 0.1, (bilinear, bicubic)  # 0.58 and 0.75 measured


def test_blend_resampling_times_both_warp_modes():
    from benchmarks import blend_resampling

    ms = blend_resampling.warp_ms(3, 32, runs=2)
    assert set(ms) == {"bilinear", "bicubic"} and all(v > 0 for v in ms.values())
