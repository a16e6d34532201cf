"""Train a TemporalNet for the embedded demo model: a ControlNet that sees the previous output
frame, warped to this one, and learns to carry it forward.

    python training/train_temporalnet.py --out /tmp/temporalnet     # seed 0 (figures: benchmarks/temporalnet.py)
    python benchmarks/temporalnet.py --model demo --controlnet /tmp/temporalnet

The net. A ControlNet made from the frozen demo U-Net as ControlNet training starts
(diffusers' ControlNetModel.from_unet; Zhang et al. 2023, arXiv:2302.05543): its encoder
half copied, a small image embedding (CONDITIONING_WIDTHS, 8x the latent size), and zero
convolutions (every residual's 1x1 conv and the embedding's last conv) at zero, so at step
0 it changes nothing. It is written as a diffusers ControlNet folder (config.json and fp16
weights) that `livestyle.models.load_controlnet` and the engine read, as
Control(net, input="temporalnet").

Objective. The demo model (U-Net, autoencoder and styles) stays frozen. Of the ControlNet,
the image embedding, the zero convolutions and the copy's conv_in and first COPY_LEVELS
levels train (--copy-levels); the rest of the copy stays the U-Net's, so save_trained's file
of the trained parts is small enough for a test fixture. For consecutive frames t - 1, t of
a synthetic camera-motion clip with exact flow (training/data.py's motion_clips over the
TRAIN images only, with sensor noise as a camera's), a random style, and the frozen model's
own outputs o (no control):

    c   = o[t - 1] warped along the clip's flow to frame t, o[t - 1] itself where the flow
          is not valid (what the engine shows TemporalNet: livestyle/stream/control.py)
    out = D(z + v(z, 0, style; residuals of ControlNet(z, 0, style, c))),  z = E(frame t)
    loss = mean over valid pixels |out - c|^2  +  FIDELITY * mean |out - o[t]|^2
           + CONTRAST * mean over images and channels (std(out) - std(o[t]))^2

through the real decoder D: consistency (carry the previous output forward where the motion
is known), fidelity (stay the model's own picture of this frame: no drift of the style) and
contrast (no flattening, which lowers an MSE to a noisy target by itself). For a first
frame the engine shows TemporalNet the frame itself; a share FIRST_FRAMES of each batch is
such a frame, without the consistency term, so a stream's first output stays the model's.
At inference the previous output is the controlled one, not o; the two are close when the
fidelity term holds.

Everything is seeded; the data and the frozen model's outputs are made once up front.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from livestyle.metrics import warp  # noqa: E402
from livestyle.models.controlnet import ControlNet, ControlNetConfig  # noqa: E402
from livestyle.models.demo import WEIGHTS_NAME, load_demo, unet_config_to_diffusers  # noqa: E402
from livestyle.models.loading import Pipeline  # noqa: E402
from livestyle.models.unet import UNet  # noqa: E402
from training.data import TRAIN, motion_clips  # noqa: E402
from training.train_demo import device_type, log  # noqa: E402

TRAINED = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")  # what the U-Net lacks
# The copy's levels that train, with its conv_in: its high-resolution ones, where the picture's
# detail is (the locked copy learned too slowly to show; all of it makes a 3.6 MB net).
COPY_LEVELS = 2
CONDITIONING_WIDTHS = (16, 16, 32, 32)  # the image embedding: 3 stride-2 convs, images at 8x the latent size
NOISE = 0.01  # per-pixel sensor noise (std, on [0, 1]), as the benchmark's clips (benchmarks/temporalnet.py)
FIDELITY = 1.0  # weight of |out - o|^2: the valid pixels' optimum is halfway between c and o
# Weight of (std(out) - std(o))^2 per image and channel: a flatter picture lowers any MSE to a
# noisy target, and without this term the net learned that first (contrast -1 to -3%, the
# warp error per contrast squared not lowered at all).
CONTRAST = 100.0
FIRST_FRAMES = 0.125  # share of each batch shown the frame itself, as a stream's first frame


def controlnet_from_unet(unet: UNet, widths: tuple[int, ...] = CONDITIONING_WIDTHS) -> ControlNet:
    """A ControlNet for `unet` as diffusers' ControlNetModel.from_unet makes one: the U-Net's
    conv_in, time embedding, down and mid blocks copied; the image embedding fresh; the zero
    convolutions (residual 1x1 convs, the embedding's conv_out) zero, so it adds nothing yet."""
    config = ControlNetConfig(**asdict(unet.config), conditioning_embedding_out_channels=widths)
    net = ControlNet(config)
    missing, _ = net.load_state_dict(unet.state_dict(), strict=False)  # the decoder half is unexpected: left out
    if stray := [k for k in missing if not k.startswith(TRAINED)]:
        raise ValueError(f"controlnet_from_unet: the U-Net has no {stray[0]}")
    with torch.no_grad():
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]:
            conv.weight.zero_()
            conv.bias.zero_()
    return net


def controlnet_config_to_diffusers(config: ControlNetConfig) -> dict:
    """The diffusers ControlNetModel `config.json` dict of a ControlNetConfig (the U-Net's keys
    less the decoder half, plus the image side); ControlNetConfig.from_diffusers reads it back."""
    # The decoder half's keys, and time_cond_proj_dim when unset (diffusers' ControlNetModel has no such key).
    drop = {"out_channels", "up_block_types"} | ({"time_cond_proj_dim"} if config.time_cond_proj_dim is None else set())
    cfg = {k: v for k, v in unet_config_to_diffusers(config).items() if k not in drop}
    return {**cfg, "_class_name": "ControlNetModel", "conditioning_channels": config.conditioning_channels,
            "conditioning_embedding_out_channels": list(config.conditioning_embedding_out_channels),
            "controlnet_conditioning_channel_order": "bgr" if config.bgr else "rgb",
            "global_pool_conditions": config.global_pool_conditions}


def save_controlnet(folder: Path, net: ControlNet, training: dict | None = None) -> Path:
    """Write `net` as a diffusers ControlNet folder: config.json (with `training`, what made it)
    and fp16 weights. Everything is converted and checked before anything is written."""
    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in net.state_dict().items()}
    if bad := [k for k, v in state.items() if not torch.isfinite(v).all()]:
        raise ValueError(f"save_controlnet: weight {bad[0]} is not finite in fp16")
    config = controlnet_config_to_diffusers(net.config)
    if training is not None:
        config["_livestyle_training"] = training
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(state, str(folder / WEIGHTS_NAME))
    return folder




def trained_parts(net: ControlNet, copy_levels: int) -> tuple[str, ...]:
    """The parameter name prefixes that train: what the U-Net lacks (TRAINED), and of the U-Net's
    copy conv_in and the first `copy_levels` down blocks (all of the copy: len(down_blocks) + 1)."""
    if copy_levels == 0:
        return TRAINED
    levels = tuple(f"down_blocks.{i}." for i in range(min(copy_levels, len(net.down_blocks))))
    return TRAINED + ("conv_in.",) + levels + (("mid_block.", "time_embedding.") if copy_levels > len(levels) else ())


def save_trained(path: Path, net: ControlNet, copy_levels: int = COPY_LEVELS) -> Path:
    """Write only the parts of `net` that trained (trained_parts: the image embedding, the zero
    convolutions and the copy's first levels, well under 1 MB) as fp16 safetensors;
    load_trained rebuilds the whole net from the U-Net and this file."""
    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in net.state_dict().items()
             if k.startswith(trained_parts(net, copy_levels))}
    widths = ",".join(str(w) for w in net.config.conditioning_embedding_out_channels)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"conditioning_embedding_out_channels": widths})
    return path


def load_trained(unet: UNet, path: Path) -> ControlNet:
    """The ControlNet save_trained wrote: `unet`'s copy (controlnet_from_unet) with the trained parts from `path`."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        widths = tuple(int(w) for w in f.metadata()["conditioning_embedding_out_channels"].split(","))
        state = {k: f.get_tensor(k).float() for k in f.keys()}
    net = controlnet_from_unet(unet, widths)
    net.load_state_dict({**net.state_dict(), **state}, strict=True)
    return net.eval().requires_grad_(False)


@dataclass
class Pairs:
    """Training examples, made once: latents z (N, C, h, w) of frame t and the frames (N, 3, H, W)
    they were made from; the control image c,
    the frozen model's output o of frame t and the consistency mask (N, 1, H, W) (0 for a
    first frame); the style index (N,). Images (N, 3, H, W) in [0, 1]."""

    z: torch.Tensor
    frames: torch.Tensor
    control: torch.Tensor
    target: torch.Tensor
    mask: torch.Tensor
    style: torch.Tensor


def frozen_output(pipeline: Pipeline, z: torch.Tensor, frames: torch.Tensor, style: torch.Tensor,
                  residuals: dict | None = None):
    """The demo model's one step at strength 1 (the engine's default): D(z + v(z, 0, style)),
    unclamped; frames: those z was made from, for a decoder that reads them (guided);
    residuals: a ControlNet's, as the U-Net takes them."""
    t = torch.zeros(z.shape[0], device=z.device)
    v = pipeline.unet(z, t, pipeline.styles.embeddings[style], **(residuals or {}))
    return pipeline.autoencoder.decode_raw(z + v, frames if pipeline.autoencoder.guided else None)


def make_pairs(pipeline: Pipeline, clips: int, frames: int, size: int, rng: np.random.Generator,
               device: torch.device) -> Pairs:
    """`clips` motion clips of `frames` frames over the TRAIN images (never the held-out
    ones), sensor noise added, one random style each; every frame after the first is a
    pair with its predecessor's output warped, every first frame one with itself."""
    styles = len(pipeline.styles.names)
    zs, frames_, controls, targets, masks, picks = [], [], [], [], [], []
    for rgb, flows, valid in motion_clips(TRAIN, rng, clips, frames, (size, size)):
        noisy = np.clip(rgb / 255 + rng.normal(0, NOISE, rgb.shape), 0, 1).astype(np.float32)
        x = torch.from_numpy(noisy).permute(0, 3, 1, 2).to(device)  # (T, H, W, 3) -> (T, 3, H, W)
        style = torch.full((frames,), int(rng.integers(styles)), device=device)
        with torch.no_grad():
            z = pipeline.autoencoder.encode(x)
            out = frozen_output(pipeline, z, x, style).clamp(0, 1)  # the engine's outputs are clamped
        o = out.permute(0, 2, 3, 1).cpu().numpy()  # (T, H, W, 3)
        moved = [np.where(valid[t][..., None], warp(o[t], flows[t]), o[t]) for t in range(frames - 1)]
        control = torch.cat([x[:1], torch.from_numpy(np.stack(moved)).permute(0, 3, 1, 2).to(device)])
        mask = torch.from_numpy(np.concatenate([np.zeros_like(valid[:1]), valid])).to(device, torch.float32)
        zs.append(z), frames_.append(x), controls.append(control), targets.append(out), masks.append(mask[:, None])
        picks.append(style)
    return Pairs(torch.cat(zs), torch.cat(frames_), torch.cat(controls), torch.cat(targets), torch.cat(masks),
                 torch.cat(picks))


def train_temporalnet(pipeline: Pipeline, steps: int, size: int, seed: int, device: torch.device = torch.device("cpu"),
                      batch: int = 8, lr: float = 1e-3, clips: int = 32, frames: int = 8,
                      fidelity: float = FIDELITY, widths: tuple[int, ...] = CONDITIONING_WIDTHS,
                      contrast: float = CONTRAST, copy_levels: int = COPY_LEVELS, every: int = 100) -> ControlNet:
    """A TemporalNet for the frozen demo `pipeline` (fp32, on `device`), trained `steps` steps
    on `size` x `size` examples from `clips` clips of `frames` frames, made up front (the
    objective: the module docstring). Seeded by `seed`."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)  # on the CPU whatever the device: same draws everywhere
    for part in (pipeline.unet, pipeline.autoencoder, pipeline.styles):
        part.eval().requires_grad_(False)
    begin = time.perf_counter()
    data = make_pairs(pipeline, clips, frames, size, rng, device)
    later = torch.nonzero(data.mask.flatten(1).amax(1) > 0).flatten()  # frames with a predecessor
    first = torch.nonzero(data.mask.flatten(1).amax(1) == 0).flatten()
    log(f"temporalnet: {clips} clips of {frames} frames at {size}x{size} ({len(later)} pairs) "
        f"in {time.perf_counter() - begin:.0f} s")
    net = controlnet_from_unet(pipeline.unet, widths).to(device).train()
    for name, p in net.named_parameters():
        p.requires_grad_(name.startswith(trained_parts(net, copy_levels)))
    trained = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=lr, weight_decay=0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    n_first = max(1, round(FIRST_FRAMES * batch))
    seen, since = torch.zeros(3, device=device), 0  # the terms' sums since the last log line
    for step in range(steps):
        pick = torch.cat([later[torch.randint(len(later), (batch - n_first,), generator=gen)],
                          first[torch.randint(len(first), (n_first,), generator=gen)]])
        z, x, c, o, mask, style = (data.z[pick], data.frames[pick], data.control[pick], data.target[pick],
                                   data.mask[pick], data.style[pick])
        context = pipeline.styles.embeddings[style]
        down, mid = net(z, torch.zeros(len(pick), device=device), context, c)
        out = frozen_output(pipeline, z, x, style, {"down_block_additional_residuals": down,
                                                    "mid_block_additional_residual": mid})
        consistency = (mask * (out - c) ** 2).sum() / (3 * mask.sum()).clamp(min=1)
        drift = ((out - o) ** 2).mean()
        flattening = ((out.std(dim=(2, 3)) - o.std(dim=(2, 3))) ** 2).mean()  # per image and channel
        loss = consistency + fidelity * drift + contrast * flattening
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        sched.step()
        seen += torch.stack([consistency.detach(), drift.detach(), (mask * (o - c) ** 2).sum() / (3 * mask.sum())])
        if (step + 1) % every == 0 or step == steps - 1:
            # means since the last line, x 1e3; "frozen": the consistency term of the frozen model's own outputs
            consistency_mean, drift_mean, frozen = (1e3 * seen / (step + 1 - since)).tolist()
            log(f"temporalnet step {step + 1:5d}/{steps}  consistency {consistency_mean:.4f} (frozen {frozen:.4f})  "
                f"fidelity {drift_mean:.4f}  x1e-3  {time.perf_counter() - begin:.0f} s")
            seen, since = torch.zeros(3, device=device), step + 1
    return net.eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="ControlNet folder to write")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--size", type=int, default=64, help="training clip side (pixels)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--clips", type=int, default=32, help="training clips, made up front")
    parser.add_argument("--frames", type=int, default=8, help="frames per clip")
    parser.add_argument("--fidelity", type=float, default=FIDELITY, help="weight of |out - o|^2")
    parser.add_argument("--contrast", type=float, default=CONTRAST, help="weight of (std(out) - std(o))^2")
    parser.add_argument("--copy-levels", type=int, default=COPY_LEVELS, help="the U-Net copy's levels that train "
                        "(with its conv_in; 0: the copy stays the U-Net's, 4: all of it, as ControlNet training)")
    parser.add_argument("--trained-only", type=Path, help="also write the trained parts alone to this .safetensors "
                        "file (load_trained; a test fixture)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", type=device_type, default=torch.device("cpu"), help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.size < 32 or args.size % 8:
        parser.error(f"--size {args.size}: a multiple of 8, at least 32")
    if args.frames < 2:
        parser.error(f"--frames {args.frames}: at least 2 (a pair)")
    for name in ("steps", "batch", "threads", "clips"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)}: at least 1")
    if args.batch < 2:
        parser.error(f"--batch {args.batch}: at least 2 (a first frame and a pair in each)")
    if not (args.lr > 0 and args.fidelity >= 0 and args.contrast >= 0):
        parser.error(f"--lr {args.lr} --fidelity {args.fidelity} --contrast {args.contrast}: need lr > 0, "
                     "the weights >= 0")
    if not 0 <= args.copy_levels <= 4:
        parser.error(f"--copy-levels {args.copy_levels}: 0 to 4 (the demo U-Net has 3 levels and a mid block)")
    if args.out.exists() and not (args.out / "config.json").is_file():
        parser.error(f"--out {args.out}: exists and is not a ControlNet folder; not overwriting it")
    torch.set_num_threads(args.threads)
    begin = time.perf_counter()
    net = train_temporalnet(load_demo(args.device), args.steps, args.size, args.seed, args.device, args.batch,
                            args.lr, args.clips, args.frames, args.fidelity, contrast=args.contrast,
                            copy_levels=args.copy_levels)
    seconds = time.perf_counter() - begin
    training = {"script": "training/train_temporalnet.py", "model": "demo", "seed": args.seed, "steps": args.steps,
                "size": args.size, "batch": args.batch, "lr": args.lr, "clips": args.clips, "frames": args.frames,
                "fidelity": args.fidelity, "contrast": args.contrast, "copy_levels": args.copy_levels, "device": str(args.device),
                "threads": args.threads, "seconds": round(seconds)}
    save_controlnet(args.out, net, training)
    if args.trained_only is not None:
        save_trained(args.trained_only, net, args.copy_levels)
        log(f"wrote {args.trained_only} ({args.trained_only.stat().st_size / 1e3:.0f} kB)")
    log(f"wrote {args.out} after {seconds / 60:.1f} min: {json.dumps(training)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
