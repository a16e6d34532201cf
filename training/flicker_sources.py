"""Where a demo model's flicker comes from: sensor noise, motion, or the autoencoder.

    python training/flicker_sources.py [--model livestyle/weights/demo] [--model DIR ...]

The warp error of training/evaluate_demo.py's clips (camera motion plus sensor noise,
the figure its table reports) is measured again under three conditions, per style and
for the autoencoder's round trip of the frames alone (no U-Net, no style):
- "motion + noise": the evaluation's clips with sensor noise of the same std (drawn here,
  so the figures differ a little from evaluate_demo's);
- "motion": the same clips without the noise;
- "noise": each clip's first frame held still, fresh noise on every frame (zero flow).
A model whose flicker is mostly "noise" turns sensor noise into texture changes (its
training should see independent noise in the views it compares); one whose flicker is
mostly "motion" does not move its texture with the scene (its encoder, U-Net or decoder
alias under sub-pixel motion). The input row is the frames' own figure (what resampling
and noise cost any output); the round trip row tells what the autoencoder alone adds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from livestyle.metrics import warp_error  # noqa: E402
from livestyle.models.demo import DEMO_MODEL  # noqa: E402
from livestyle.models.loading import decode_frames, load_pipeline  # noqa: E402
from livestyle.stream.restyle import restyle  # noqa: E402
from training.data import HELD_OUT, motion_clips  # noqa: E402
from training.evaluate_demo import NOISE  # noqa: E402
from training.train_demo import STYLES  # noqa: E402

CONDITIONS = ("motion + noise", "motion", "noise")


def conditions(clips, seed: int = 1) -> dict[str, list[tuple[torch.Tensor, np.ndarray, np.ndarray]]]:
    """Each condition's clips as (frames (T,3,H,W) float in [0,1], flows, valid)."""
    rng = np.random.default_rng(seed)
    out = {name: [] for name in CONDITIONS}
    for frames, flows, valid in clips:
        x = frames.astype(np.float32) / 255
        still = np.repeat(x[:1], len(x), axis=0)
        for name, clip, flow, ok in (("motion + noise", x, flows, valid), ("motion", x, flows, valid),
                                     ("noise", still, np.zeros_like(flows), np.ones_like(valid))):
            if name != "motion":
                clip = np.clip(clip + rng.normal(0, NOISE, clip.shape).astype(np.float32), 0, 1)
            out[name].append((torch.from_numpy(clip).permute(0, 3, 1, 2).contiguous(), flow, ok))
    return out


def flicker(outputs: torch.Tensor, flows: np.ndarray, valid: np.ndarray) -> float:
    return warp_error(outputs.permute(0, 2, 3, 1).numpy(), flows, valid)


@torch.no_grad()
def measure(pipe, clips: dict) -> dict[str, dict[str, float]]:
    """{row: {condition: mean warp error x 1e3}} for the input frames themselves (what the
    clips' and the metric's resampling cost), the round trip, each style and their mean."""
    rows = {"input": {}, "round trip": {}} | {style: {} for style in STYLES}
    contexts = {style: pipe.styles.context(style) for style in STYLES}
    for name, items in clips.items():
        inputs, trips, styled = [], [], {style: [] for style in STYLES}
        for frames, flows, valid in items:
            inputs.append(flicker(frames, flows, valid))
            trips.append(flicker(decode_frames(pipe.autoencoder, pipe.autoencoder.encode(frames), frames), flows, valid))
            for style, context in contexts.items():
                out = torch.cat([restyle(pipe, f[None], context) for f in frames])
                styled[style].append(flicker(out, flows, valid))
        rows["input"][name] = float(np.mean(inputs)) * 1e3
        rows["round trip"][name] = float(np.mean(trips)) * 1e3
        for style in STYLES:
            rows[style][name] = float(np.mean(styled[style])) * 1e3
    rows["styles (mean)"] = {name: float(np.mean([rows[style][name] for style in STYLES])) for name in clips}
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, action="append", help="a demo model folder (repeatable; "
                        "default the shipped one)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--clips", type=int, default=3)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.size < 8 or args.size % 8:
        parser.error(f"--size must be a positive multiple of 8, got {args.size}")
    for model in args.model or []:
        if not (model / "model_index.json").is_file():
            parser.error(f"--model {model}: not a model folder (no model_index.json)")
    torch.set_num_threads(args.threads)
    clips = conditions(motion_clips(HELD_OUT, np.random.default_rng(0), args.clips, args.frames,
                                    (args.size, args.size)))
    print(f"warp error x 1e3 on {args.clips} clips of {args.frames} frames at {args.size}x{args.size} "
          f"({', '.join(HELD_OUT)}), noise std {NOISE}; lower is steadier")
    print("| model | row | " + " | ".join(CONDITIONS) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in CONDITIONS) + " |")
    for model in args.model or [DEMO_MODEL]:
        for row, figures in measure(load_pipeline(model), clips).items():
            print(f"| {model.name} | {row} | " + " | ".join(f"{figures[c]:.3f}" for c in CONDITIONS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
