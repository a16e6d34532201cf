"""TemporalNet against flicker: warp error of consecutive outputs with a TemporalNet-style
ControlNet on, against off, through the engine, with tiny random weights or a trained net.

    python benchmarks/temporalnet.py [--model random-sd|demo] [--scales 0.5 1 2] [--steps 1|2]
                                     [--clips 6] [--frames 10] [--size 64]
    python benchmarks/temporalnet.py --controlnet /tmp/temporalnet    # training/train_temporalnet.py's

What is measured. A model, and a ControlNet made from its U-Net as ControlNet training
starts (diffusers' ControlNetModel.from_unet), every parameter perturbed (seeded) so
that its zero convolutions are not zero, named in StreamSettings.controls as
Control(input="temporalnet"): each frame's control image is the stream's previous
output, warped along the motion to this frame when the flow is on
(livestyle/stream/control.py). The model: "random-sd", a tiny random SD 1.x-shaped one
(a 2-level U-Net with self-attention, TAESD's autoencoder, a one-layer CLIP, seeded),
whose outputs are nearly flat (a random decoder: pixel std ~0.01), so its warp errors
are a few grey levels; or "demo", the embedded demo model (trained, so its outputs are
pictures), with a random ControlNet from its U-Net. The clips: synthetic camera motion over the held-out
images with their exact flow and a little sensor noise (training/data.py, as
benchmarks/temporal_quality.py). Each clip goes through the engine as a file stream
(every frame restyled), per frame (no stream batch: TemporalNet sees the last output),
seed 0, random-sd: 1 step at StreamDiffusion's t_index 32 (timestep 359), or 2 at
t_index 32 and 45 with --steps 2 (then each span of --spans puts the ControlNet on some
steps only); demo: its own strength 1; the other temporal parts off; the flow, when on, only warps TemporalNet's image (its
latent and output blends are 0). Figures per clip and configuration: the warp error
(livestyle.metrics.warp_error: MSE between each output and its predecessor warped along
the true motion, occluded pixels masked, x 1e3: lower is steadier), its ratio on / off,
the outputs' contrast (standard deviation of the output pixels), and the ratio with each
warp error divided by its contrast squared (a flatter picture alone lowers an MSE).

The weights are random: a trained TemporalNet learned to carry the previous output
forward; a random one only adds residuals computed from it. So this measures whether
the engine's TemporalNet conditioning lowers warp error as such, not what a trained
TemporalNet does to real footage.

Found (2026-12-01, 2-core CPU, 6 clips of 10 frames at 64x64; the figures are
deterministic), warp error on / off, median [min-max] over the clips:
- random-sd, 1 step, scale 0.5 / 1 / 2: 1.32 [1.23-1.39] / 1.13 [0.93-1.20] / 1.03
  [0.85-1.10], lowered in 0, 1 and 3 clips of 6; the contrast rose 8-18% (per contrast
  squared: 0.95 / 0.94 / 0.89).
- random-sd, 2 steps, scale 1 / 2 (start-end 0-1): 0.85 [0.73-0.91] / 0.74 [0.60-0.81],
  every clip lowered, but the contrast fell 14% / 23%, more than that accounts for (per
  contrast squared: 1.17 / 1.25); on the first or the second step only: the same.
- demo, scale 0.25 / 0.5 / 1 / 2: 0.97 [0.88-1.09] / 0.97 [0.91-1.11] / 1.95 / 3.36,
  lowered in 4, 4, 0 and 0 clips of 6.
So a random TemporalNet does not lower warp error consistently. Flow on or off changes
the ratios by under 0.01 (these clips move 2-3 pixels a frame).

A trained one (training/train_temporalnet.py, seed 0, its defaults: 800 steps at 64x64,
3.3 min on the 2-core CPU; `--controlnet /tmp/temporalnet`, 6 held-out clips of 10 frames
at 64x64, deterministic), warp error on / off, median [min-max], clips lowered, the same
per contrast squared, contrast on / off, drift:
- scale 1: 0.992 [0.989-1.001], 5 of 6; 0.997 [0.991-1.004], 4 of 6; 0.999; 0.0067.
- scale 2: 0.983 [0.975-1.000], 6 of 6; 0.992 [0.982-1.006], 5 of 6; 0.997; 0.0189.
Flow on or off: the same to 0.001. So it lowers warp error, steadily but by 1-2% only,
without flattening (contrast within 0.3%) and staying the model's picture (drift 0.02e-3,
RMS 1 grey level, against warp errors of 0.07e-3 to 1.2e-3): its outputs move little.
In training its consistency term fell 7% below the frozen model's (0.488 against 0.523e-3
in the last 100 steps). Other runs of the script, same measure:
- the whole U-Net copy trained, no contrast term (--steps 400 --clips 256 --frames 4
  --copy-levels 4 --contrast 0, 3.6 min): scale 1 / 2: 0.976 [0.970-1.020] / 0.955
  [0.941-1.042], 5 of 6 each; per contrast squared 0.985 / 0.971; contrast 0.997 / 0.993;
  drift 0.0099 / 0.0335. A larger lowering, with slightly more flattening; a 3.6 MB net.
- the copy locked (--copy-levels 0 --lr 2e-3, 800 steps; 3 clips only): 0.996 / 0.989,
  per contrast squared 1.008 / 1.007: nothing beyond flattening.
Longer training (thousands of steps) was not measured: the shared CPU ran it at 0.07-0.8 s
a step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from livestyle.config import Control, StreamSettings, TemporalSettings  # noqa: E402
from livestyle.errors import LivestyleError  # noqa: E402
from livestyle.metrics import warp_error  # noqa: E402
from livestyle.models.loading import NoiseSchedule, Pipeline, TextModel  # noqa: E402
from livestyle.stream.engine import Engine  # noqa: E402
# The held-out clips with sensor noise, as the flicker benchmark makes them.
from benchmarks.temporal_quality import clips  # noqa: E402, F401  (tests import it from here too)

TIMESTEP = 359  # StreamDiffusion's t_index_list [32] of LCM's 50 (benchmarks/peers.py's 1 step)
TIMESTEPS = {1: (TIMESTEP,), 2: (TIMESTEP, 99)}  # 2 steps: t_index [32, 45], as benchmarks/peers.py
PROMPT = "an oil painting"


def _perturbed(module: torch.nn.Module, seed: int, scale: float) -> torch.nn.Module:
    """Seeded Gaussian noise added to every parameter (ControlNet's zero convolutions
    included, which would otherwise add nothing); eval mode, no gradients."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module.eval().requires_grad_(False)


def tiny_unet():
    """diffusers' UNet2DConditionModel, SD 1.x's kind shrunk: 2 levels, self- and cross-attention at the first."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return _perturbed(UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=(2, 4),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8), 1, 0.1)


def demo_unet():
    """The embedded demo model's U-Net in diffusers' class (its folder is diffusers' layout)."""
    from diffusers import UNet2DConditionModel

    from livestyle.models.demo import DEMO_MODEL

    return UNet2DConditionModel.from_pretrained(DEMO_MODEL / "unet").eval().requires_grad_(False)


def tiny_pipeline(reference) -> Pipeline:
    """livestyle's pipeline around `reference`'s U-Net weights: TAESD's autoencoder and a one-layer CLIP, random."""
    from livestyle.models.clip import TextEncoder, TextEncoderConfig
    from livestyle.models.taesd import TinyAutoencoder
    from livestyle.models.tokenizer import Tokenizer
    from livestyle.models.unet import UNet, UNetConfig

    unet = UNet(UNetConfig.from_diffusers(dict(reference.config)))
    unet.load_state_dict(reference.state_dict(), strict=True)
    torch.manual_seed(0)
    text = _perturbed(TextEncoder(TextEncoderConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                    num_attention_heads=4)), 3, 0.05)
    autoencoder = _perturbed(TinyAutoencoder(4), 2, 0.02)
    return Pipeline("sd1", unet.eval().requires_grad_(False), autoencoder, TextModel(text, Tokenizer.bundled()),
                    NoiseSchedule(), Path("tiny-random-sd"))


def save_temporalnet(reference, folder: Path, seed: int = 20, scale: float = 0.1) -> Path:
    """A TemporalNet-shaped ControlNet (3-channel image, SD 1.x's) from `reference`, perturbed,
    saved as a diffusers folder; its path."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = _perturbed(ControlNetModel.from_unet(reference, conditioning_embedding_out_channels=(8, 8, 16, 16)),
                     seed, scale)
    net.save_pretrained(folder)
    return folder


def outputs(engine: Engine, settings: StreamSettings, frames: np.ndarray) -> np.ndarray:
    """The stream's output frames (T, H, W, 3) in [0, 1], every input frame restyled."""
    out = []
    stream = engine.open_stream(settings, lambda f: out.append(f.to_ndarray(format="rgb24")), live=False)
    for rgb in frames:
        stream.submit(rgb)
    if not stream.flush(timeout=300):
        raise RuntimeError("the engine did not finish the clip in 300 s")
    stream.close()
    if len(out) != len(frames):
        raise RuntimeError(f"{len(frames)} frames in, {len(out)} out")
    return np.stack(out).astype(np.float32) / 255


def settings(size: int, net: Path | None, scale: float, flow: bool, start: float = 0.0, end: float = 1.0,
             steps: int = 1, demo: bool = False) -> StreamSettings:
    """Per frame, `steps` steps (SD: from TIMESTEP on); TemporalNet at `scale` from start to
    end (none when net is None); the flow, when on, only warps TemporalNet's image."""
    temporal = TemporalSettings(attention_frames=0, flow=flow, flow_blend=0.0, output_blend=0.0)
    controls = (Control(str(net), "temporalnet", scale, start, end),) if net is not None else ()
    timing = dict(steps=steps) if demo else dict(timesteps=TIMESTEPS[steps], prompt=PROMPT)
    return StreamSettings(size=(size, size), stream_batch=False, temporal=temporal, controls=controls, **timing)


@dataclass
class Figure:
    """One configuration on one clip: warp error (x 1e3) and contrast (output pixel std), off and on,
    and the drift of the outputs on from those off."""

    clip: int
    off: float
    on: float
    contrast_off: float
    contrast_on: float
    drift: float  # MSE x 1e3 (the warp error's units) between the outputs on and off: off the model's own picture

    @property
    def ratio(self) -> float:
        return self.on / self.off

    @property
    def ratio_per_contrast(self) -> float:
        """The ratio with each warp error divided by its outputs' contrast squared: an MSE
        shrinks with the square of a picture's contrast, so a flatter output alone lowers it."""
        return self.ratio * (self.contrast_off / self.contrast_on) ** 2


def measure(engine: Engine, net: Path, data: list, size: int, scale: float, flow: bool, start: float = 0.0,
            end: float = 1.0, steps: int = 1, demo: bool = False) -> list[Figure]:
    """TemporalNet on against off, same seed, same frames, clip by clip."""
    figures = []
    for i, (frames, flows, valid) in enumerate(data):
        off = outputs(engine, settings(size, None, 0.0, flow, steps=steps, demo=demo), frames)
        on = outputs(engine, settings(size, net, scale, flow, start, end, steps, demo), frames)
        figures.append(Figure(i, 1e3 * warp_error(off, flows, valid), 1e3 * warp_error(on, flows, valid),
                              float(off.std()), float(on.std()), 1e3 * float(((on - off) ** 2).mean())))
    return figures


def trained_mismatch(path: Path) -> str | None:
    """Why `path` is not a ControlNet the demo model can run (one line), or None."""
    from livestyle.models.demo import DEMO_MODEL
    from livestyle.models.unet import UNetConfig
    from livestyle.stream import control

    if not path.exists():
        return "no such file or folder"
    try:
        config = control.read_config(path)
    except LivestyleError as e:
        return str(e)
    unet = UNetConfig.from_diffusers(json.loads((DEMO_MODEL / "unet" / "config.json").read_text()))
    return control.mismatch(unet, config)


def _span(text: str) -> tuple[float, float]:
    try:
        start, end = (float(v) for v in text.split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: START-END, e.g. 0-1 or 0.5-1") from None
    if not 0 <= start < end <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= START < END <= 1")
    return start, end


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("random-sd", "demo"),
                        help="random-sd (the default), or demo (the default with --controlnet)")
    parser.add_argument("--controlnet", type=Path, help="a trained TemporalNet for the demo model (a ControlNet "
                        "folder, e.g. training/train_temporalnet.py's) instead of a random one")
    parser.add_argument("--size", type=int, default=64, help="processing size, square (default 64)")
    parser.add_argument("--clips", type=int, default=6, help="motion clips (default 6)")
    parser.add_argument("--frames", type=int, default=10, help="frames per clip (default 10)")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="TemporalNet scales")
    parser.add_argument("--steps", type=int, choices=(1, 2), default=1)
    parser.add_argument("--spans", type=_span, nargs="+", default=[(0.0, 1.0)],
                        help="TemporalNet's start-end, e.g. 0-1 0-0.5 0.5-1 (with --steps 2)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.size % 8 or not 64 <= args.size <= 512:
        parser.error(f"--size {args.size}: a multiple of 8 from 64 to 512")
    if args.clips < 1 or args.frames < 2:
        parser.error(f"--clips {args.clips} --frames {args.frames}: at least 1 clip of at least 2 frames")
    if bad := [s for s in args.scales if not 0 < s <= 2]:
        parser.error(f"--scales {bad[0]:g}: a ControlNet scale in (0, 2] (0 is off: the baseline)")
    if args.controlnet is not None:
        if args.model == "random-sd":
            parser.error("--controlnet: a trained TemporalNet is for the demo model (--model demo)")
        args.model = "demo"
        if why := trained_mismatch(args.controlnet):
            parser.error(f"--controlnet {args.controlnet}: {why}")
    args.model = args.model or "random-sd"
    torch.set_num_threads(args.threads)
    demo = args.model == "demo"
    data = clips(args.size, args.clips, args.frames)
    timing = f"{args.steps} step(s), strength 1" if demo else f"{args.steps} step(s) from t={TIMESTEP}"
    kind = f"the trained ControlNet {args.controlnet}" if args.controlnet else "a random ControlNet"
    print(f"TemporalNet, {kind} on the {args.model} model: warp error x1e3 of {args.clips} held-out motion "
          f"clips of {args.frames} frames at {args.size}x{args.size}, {timing}, seed 0, per frame, TemporalNet on "
          f"against off (same frames); contrast = output pixel std; drift = MSE x1e3 between the outputs on and off")
    if demo:
        from livestyle.models.demo import load_demo

        reference, load = demo_unet(), load_demo
    else:
        reference = tiny_unet()
        load = lambda: tiny_pipeline(reference)  # noqa: E731  (the engine's worker loads it)
    with tempfile.TemporaryDirectory() as tmp, Engine(load) as engine:
        net = args.controlnet.resolve() if args.controlnet else save_temporalnet(reference, Path(tmp) / "temporalnet")
        print("| flow | scale | start-end | clip | warp error off | on | on / off | contrast off | on | drift |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        summary = []
        for flow in (True, False):
            for scale in args.scales:
                for start, end in args.spans:
                    figures = measure(engine, net, data, args.size, scale, flow, start, end, args.steps, demo)
                    for f in figures:
                        print(f"| {'on' if flow else 'off'} | {scale:g} | {start:g}-{end:g} | {f.clip} | "
                              f"{f.off:.4f} | {f.on:.4f} | {f.ratio:.3f} | {f.contrast_off:.4f} | "
                              f"{f.contrast_on:.4f} | {f.drift:.4f} |")
                    summary.append((flow, scale, f"{start:g}-{end:g}", figures))
        print("\n| flow | scale | start-end | warp error on / off: median [min-max] | clips lowered | "
              "the same per contrast squared | clips lowered | contrast on / off: median | drift: median |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for flow, scale, span, figures in summary:
            cells = [f"{statistics.median(r):.3f} [{min(r):.3f}-{max(r):.3f}] | {sum(x < 1 for x in r)} of {len(r)}"
                     for r in ([f.ratio for f in figures], [f.ratio_per_contrast for f in figures])]
            contrast = statistics.median(f.contrast_on / f.contrast_off for f in figures)
            drift = statistics.median(f.drift for f in figures)
            print(f"| {'on' if flow else 'off'} | {scale:g} | {span} | {cells[0]} | {cells[1]} | {contrast:.3f} | "
                  f"{drift:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
