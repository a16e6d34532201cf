"""SD-Turbo's architecture with random weights, and the three systems that restyle frames with it.

    parts = sd_turbo_parts()                 # one set of weights, shared by all three systems
    systems = frame_systems(parts, size=256, steps=1, stream_batch=True)
    for name, system in systems.items(): system.open(); system(frame); system.close()

The weights: diffusers' UNet2DConditionModel in the SD 2.1 U-Net config (SD-Turbo's:
64-channel heads, linear projections, 1024-d context) and AutoencoderTiny (TAESD's
config), as diffusers initialises them (seeded). livestyle's U-Net holds the very same
tensors (`load_state_dict(assign=True)`, no copy); its tiny autoencoder gets them through
`tiny_from_diffusers`. Speed does not depend on the weights, and no checkpoint can be
downloaded here.

The prompt: one embedding (1, 77, 1024) of PROMPT by a one-layer livestyle text encoder,
as the engine encodes it; the peers are handed that tensor. A prompt is encoded once per change, never per frame, so
the text encoder is outside what is timed and its size does not matter.

The frame, for each system, from a uint8 (H, W, 3) frame to a uint8 (H, W, 3) frame:
- livestyle: `Engine` with a file stream (every frame restyled, on the engine's worker
  thread), temporal parts off unless asked for, in each Variant asked for (kernels,
  compile, CUDA graphs, channels_last);
- StreamDiffusion (`streamdiffusion` 0.1.1, if installed): its own encode_image ->
  predict_x0_batch -> decode_image, which is its `__call__` without the CUDA events that
  call records (they need CUDA), with `use_denoising_batch` for the stream batch;
- diffusers: StableDiffusionImg2ImgPipeline with AutoencoderTiny and LCMScheduler, the
  same timesteps given explicitly, strength 1 (so all of them run), no guidance.

All three use the same timesteps: StreamDiffusion's t_index_list into the 50-step LCM
schedule (1 step: [32]; 2: [32, 45]; 4: [0, 16, 32, 45]).

SDXL-Turbo (`sdxl_turbo_parts`): the SDXL base U-Net config (SDXL-Turbo's: no attention at
the first level, transformer depth 1, 2 and 10 at the next two, 2048-d context, the
text_time added embedding of a 1280-d pooled text embedding and 6 time ids) in both
libraries, and AutoencoderTiny in TAESD's config, which is TAESDXL's too (the two differ
only in their weights). The prompt: two small random text encoders of SDXL's widths (768
and 1280, the second with a 1280-d pooled projection), so the context (1, 77, 2048) and
the pooled embedding (1, 1280) have SDXL's shapes; the engine encodes the prompt with
them, the U-Net rows are handed those tensors.
"""

from __future__ import annotations

import copy
import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from livestyle import kernels
from livestyle.config import StreamSettings, TemporalSettings
from livestyle.stream.samplers import lcm_timesteps

T_INDEX = {1: [32], 2: [32, 45], 3: [16, 32, 45], 4: [0, 16, 32, 45]}

# The SD 2.1 U-Net (SD-Turbo's); diffusers' names.
SD21_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
    upcast_attention=False, norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
)
# A U-Net of the same kind small enough for a CPU smoke run in seconds (the autoencoder
# stays TAESD's: livestyle loads only TAESD's layer count, and it is small).
TINY_UNET = dict(
    SD21_UNET, block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4), cross_attention_dim=32,
    layers_per_block=1,
)
# The SDXL base U-Net (stabilityai/sdxl-turbo unet/config.json is the same); diffusers' names.
SDXL_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, upcast_attention=False, norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True,
    freq_shift=0, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=1280 + 6 * 256,
)
SDXL_TEXT_WIDTHS = (768, 1280)  # CLIP ViT-L's and OpenCLIP ViT-bigG's hidden sizes; bigG's pooled projection: 1280
# The same kind, small: no attention at level 0, two transformer layers at level 1, the
# added embedding with SDXL's 256-d time ids and a 32-d pooled embedding.
TINY_SDXL_UNET = dict(
    SDXL_UNET, block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
    attention_head_dim=(2, 4), cross_attention_dim=64, layers_per_block=1,
    projection_class_embeddings_input_dim=32 + 6 * 256,
)
TINY_SDXL_TEXT_WIDTHS = (32, 32)


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@dataclass
class Parts:
    """One set of weights in both libraries' modules (the U-Nets share their tensors)."""

    unet_config: dict
    diffusers_unet: torch.nn.Module
    unet: torch.nn.Module  # livestyle's
    diffusers_autoencoder: torch.nn.Module
    autoencoder: torch.nn.Module  # livestyle's
    text: object  # livestyle TextModel
    context: torch.Tensor  # (1, 77, D) the prompt's embedding
    family: str = "sd2"  # livestyle's Pipeline.family: "sd2" (SD-Turbo) or "sdxl" (SDXL-Turbo)
    text_2: object = None  # SDXL: the second TextModel (with the pooled projection)
    pooled: torch.Tensor | None = None  # SDXL: (1, P) the prompt's pooled embedding

    @property
    def context_dim(self) -> int:
        return self.unet_config["cross_attention_dim"]

    def unet_calls(self, x: torch.Tensor, t: torch.Tensor) -> dict:
        """{"livestyle": fn, "diffusers": fn}: one call of each U-Net on latents x (B, 4, h, w)
        at timestep t (B,), with the prompt's conditioning (SDXL: the pooled embedding and the
        time ids of an uncropped frame of x's size, in pixels, as the engine passes them)."""
        c = self.context.expand(len(x), -1, -1)
        if self.family != "sdxl":
            return {"livestyle": lambda: self.unet(x, t, c),
                    "diffusers": lambda: self.diffusers_unet(x, t, encoder_hidden_states=c).sample}
        h, w = x.shape[-2] * 8, x.shape[-1] * 8
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], device=x.device, dtype=torch.float32)  # fp32, as the engine's
        added = {"text_embeds": self.pooled.expand(len(x), -1), "time_ids": time_ids.expand(len(x), -1)}
        return {"livestyle": lambda: self.unet(x, t, c, **added),
                "diffusers": lambda: self.diffusers_unet(x, t, encoder_hidden_states=c,
                                                         added_cond_kwargs=added).sample}


def sd_turbo_parts(tiny: bool = False, device: str = "cpu", dtype: torch.dtype = torch.float32,
                   seed: int = 0) -> Parts:
    """SD-Turbo's architecture (or, with `tiny`, a small one of the same kind) in diffusers'
    and livestyle's modules, identical weights, eval mode, on `device` in `dtype`."""
    from diffusers import AutoencoderTiny, UNet2DConditionModel

    from livestyle.models.clip import TextEncoder, TextEncoderConfig
    from livestyle.models.loading import TextModel
    from livestyle.models.taesd import TinyAutoencoder, tiny_from_diffusers
    from livestyle.models.tokenizer import Tokenizer
    from livestyle.models.unet import UNet, UNetConfig

    torch.manual_seed(seed)
    cfg = TINY_UNET if tiny else SD21_UNET
    with torch.device(device):  # initialised where they run (a GPU makes 865M parameters in seconds)
        dunet = UNet2DConditionModel(**cfg).eval().requires_grad_(False)
        unet = UNet(UNetConfig.from_diffusers(dict(dunet.config))).eval().requires_grad_(False)
        unet.load_state_dict(dunet.state_dict(), strict=True, assign=True)  # the same tensors
        dae = AutoencoderTiny(latent_channels=4).eval().requires_grad_(False)
        ae = TinyAutoencoder.from_state_dicts(*tiny_from_diffusers(dae.state_dict())).eval().requires_grad_(False)
        D = cfg["cross_attention_dim"]
        encoder = TextEncoder(TextEncoderConfig(hidden_size=D, intermediate_size=4 * D, num_hidden_layers=1,
                                                num_attention_heads=max(1, D // 64), hidden_act="gelu")).eval()
    text = TextModel(encoder, Tokenizer.bundled(pad_token="!"))
    parts = Parts(cfg, dunet, unet, dae, ae, text, torch.empty(0))
    if (device, dtype) != ("cpu", torch.float32):  # (diffusers warns about any dtype cast, even a no-op one)
        for m in (dunet, unet, dae, ae, encoder):
            m.to(device, dtype)
    with torch.inference_mode():
        from livestyle.models.prompt import encode_prompt

        # As the engine's Conditioning encodes it (PromptCache, no skipped layers).
        parts.context = encode_prompt(encoder, text.tokenizer, PROMPT).to(device, dtype)
    return parts


def sdxl_turbo_parts(tiny: bool = False, device: str = "cpu", dtype: torch.dtype = torch.float32,
                     seed: int = 0) -> Parts:
    """SDXL-Turbo's architecture (or, with `tiny`, a small one of the same kind) in diffusers'
    and livestyle's modules, identical weights, eval mode, on `device` in `dtype`; the
    context and pooled embedding from two small random text encoders of SDXL's widths."""
    from diffusers import AutoencoderTiny, UNet2DConditionModel

    from livestyle.models.clip import TextEncoder, TextEncoderConfig
    from livestyle.models.loading import TextModel
    from livestyle.models.prompt import encode_prompt_sdxl
    from livestyle.models.taesd import TinyAutoencoder, tiny_from_diffusers
    from livestyle.models.tokenizer import Tokenizer
    from livestyle.models.unet import UNet, UNetConfig

    torch.manual_seed(seed)
    cfg = TINY_SDXL_UNET if tiny else SDXL_UNET
    widths = TINY_SDXL_TEXT_WIDTHS if tiny else SDXL_TEXT_WIDTHS
    pooled_dim = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    with torch.device(device):
        dunet = UNet2DConditionModel(**cfg).eval().requires_grad_(False)
        # On the meta device, then given diffusers' tensors: one copy of SDXL's 10 GB (fp32), not two.
        with torch.device("meta"):
            unet = UNet(UNetConfig.from_diffusers(dict(dunet.config)))
        unet.load_state_dict(dunet.state_dict(), strict=True, assign=True)
        unet.eval().requires_grad_(False)
        dae = AutoencoderTiny(latent_channels=4).eval().requires_grad_(False)  # TAESDXL's config
        ae = TinyAutoencoder.from_state_dicts(*tiny_from_diffusers(dae.state_dict())).eval().requires_grad_(False)
        # Two layers each: SDXL takes the penultimate hidden state.
        encoders = [TextEncoder(TextEncoderConfig(hidden_size=D, intermediate_size=4 * D, num_hidden_layers=2,
                                                  num_attention_heads=max(1, D // 64), hidden_act=act,
                                                  projection_dim=projection)).eval()
                    for D, act, projection in zip(widths, ("quick_gelu", "gelu"), (None, pooled_dim))]
    texts = [TextModel(encoders[0], Tokenizer.bundled()), TextModel(encoders[1], Tokenizer.bundled(pad_token="!"))]
    parts = Parts(cfg, dunet, unet, dae, ae, texts[0], torch.empty(0), family="sdxl", text_2=texts[1])
    if (device, dtype) != ("cpu", torch.float32):
        for m in (dunet, unet, dae, ae, *encoders):
            m.to(device, dtype)
    with torch.inference_mode():
        prompt = encode_prompt_sdxl(encoders[0], texts[0].tokenizer, encoders[1], texts[1].tokenizer, PROMPT)
    parts.context, parts.pooled = prompt.context.to(device, dtype), prompt.pooled.to(device, dtype)
    return parts


PROMPT = "an oil painting"


def timesteps(steps: int) -> list[int]:
    return lcm_timesteps(t_index_list=T_INDEX[steps])


# -- The frame systems: open(), __call__(uint8 frame) -> uint8 frame or None, close() ---------------

@dataclass(frozen=True)
class Variant:
    """How livestyle's engine runs: Engine's own options, and the kernels' backend."""

    temporal: bool = False
    kernels: str | None = None  # livestyle.kernels.set_backend; None: the bench's own (--kernels, else auto)
    compile: str | None = None
    cuda_graphs: bool = False
    channels_last: bool = False  # converts the modules' weights in place: runs on its own copy


class LivestyleFrames:
    """livestyle's Engine, one file stream; __call__ submits a frame, outputs arrive on the worker."""

    latency_frames = 0

    def __init__(self, parts: Parts, size: int, steps: int, stream_batch: bool, variant: Variant,
                 device: str, dtype: torch.dtype):
        self.parts, self.variant, self.device, self.dtype = parts, variant, device, dtype
        self.outside = kernels.backend()  # the bench's backend, given back on close()
        self.backend = variant.kernels or self.outside
        temporal = variant.temporal
        self.settings = StreamSettings(size=(size, size), prompt=PROMPT, timesteps=tuple(timesteps(steps)),
                                       steps=steps, stream_batch=stream_batch,
                                       temporal=TemporalSettings() if temporal else TemporalSettings.off())
        self.engine = self.stream = None
        self.submitted = self.done = 0
        # Frames still in the stream batch when the last submitted one has run: S - 1 with S
        # steps batched (StreamDiffusion's too), none per frame.
        self.in_flight = steps - 1 if stream_batch else 0
        self.cond = threading.Condition()

    def open(self) -> None:
        from livestyle.models.loading import NoiseSchedule, Pipeline
        from livestyle.stream.engine import Engine

        p, v = self.parts, self.variant
        unet, autoencoder = (copy.deepcopy(p.unet), copy.deepcopy(p.autoencoder)) if v.channels_last else \
            (p.unet, p.autoencoder)
        pipe = Pipeline(p.family, unet, autoencoder, p.text, NoiseSchedule(), Path(f"{p.family}-turbo-architecture"),
                        text_2=p.text_2)
        self.engine = Engine(pipe, self.device, self.dtype, compile=v.compile, cuda_graphs=v.cuda_graphs,
                             channels_last=v.channels_last)
        self.stream = self.engine.open_stream(self.settings, self._out, live=False)

    def _out(self, frame) -> None:
        with self.cond:
            self.done += 1
            self.cond.notify_all()

    def __call__(self, frame: np.ndarray) -> None:
        kernels.set_backend(self.backend)  # process-wide: the systems take turns, so set per frame
        self.submitted += 1
        self.stream.submit(frame)

    def finish(self) -> None:
        """Wait until the step for the last submitted frame has run: every frame is out but the
        stream batch's last S - 1, which stay in flight as StreamDiffusion's do. (Flushing them
        would cost S - 1 more U-Net calls a round that StreamDiffusion is not asked for.)"""
        with self.cond:
            self.cond.wait_for(lambda: self.done >= self.submitted - self.in_flight)

    def close(self) -> None:
        stats = self.stream.stats()
        self.latency_frames = stats.latency_frames
        self.stream.close()
        self.engine.close()
        self.engine = self.stream = None
        kernels.set_backend(self.outside)


def _to_tensor(frame: np.ndarray, device, dtype) -> torch.Tensor:
    """uint8 (H, W, 3) -> (1, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(frame).to(device).permute(2, 0, 1)[None].to(dtype) / 127.5 - 1


def _to_frame(x: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [-1, 1] -> uint8 (H, W, 3)."""
    return ((x[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


def _diffusers_pipe(parts: Parts):
    from diffusers import LCMScheduler, StableDiffusionImg2ImgPipeline

    scheduler = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                             prediction_type="epsilon", timestep_spacing="leading", steps_offset=1)
    return StableDiffusionImg2ImgPipeline(vae=parts.diffusers_autoencoder, text_encoder=None, tokenizer=None,
                                          unet=parts.diffusers_unet, scheduler=scheduler, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)


class DiffusersFrames:
    """diffusers' img2img pipeline with AutoencoderTiny, on the caller's thread, one frame per call."""

    latency_frames = 0

    def __init__(self, parts: Parts, size: int, steps: int, device: str, dtype: torch.dtype):
        self.parts, self.size, self.steps, self.device, self.dtype = parts, size, steps, device, dtype

    def open(self) -> None:
        self.pipe = _diffusers_pipe(self.parts)
        self.pipe.set_progress_bar_config(disable=True)

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            image = _to_tensor(frame, self.device, self.dtype) * 0.5 + 0.5  # the pipeline takes [0, 1] tensors
            out = self.pipe(prompt_embeds=self.parts.context, image=image, timesteps=timesteps(self.steps),
                            strength=1.0, guidance_scale=1.0, output_type="pt", return_dict=False)[0]
            return _to_frame(out * 2 - 1)

    def finish(self) -> None:
        pass

    def close(self) -> None:
        self.pipe = None


class StreamDiffusionFrames:
    """StreamDiffusion (the PyPI package) over the same diffusers modules, on the caller's thread."""

    def __init__(self, parts: Parts, size: int, steps: int, stream_batch: bool, device: str, dtype: torch.dtype):
        self.parts, self.size, self.steps, self.stream_batch = parts, size, steps, stream_batch
        self.device, self.dtype = device, dtype
        self.latency_frames = steps - 1 if stream_batch else 0

    def open(self) -> None:
        from streamdiffusion import StreamDiffusion

        pipe = _diffusers_pipe(self.parts)
        # Its prepare() encodes the prompt through the pipeline: hand it the shared embedding.
        pipe.encode_prompt = lambda **kw: (self.parts.context, self.parts.context)
        self.sd = StreamDiffusion(pipe, t_index_list=T_INDEX[self.steps], torch_dtype=self.dtype,
                                  width=self.size, height=self.size, use_denoising_batch=self.stream_batch,
                                  cfg_type="none")
        self.sd.prepare(PROMPT, num_inference_steps=50, guidance_scale=1.0)

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            sd = self.sd
            return _to_frame(sd.decode_image(sd.predict_x0_batch(sd.encode_image(
                _to_tensor(frame, self.device, self.dtype)))))

    def finish(self) -> None:
        pass

    def close(self) -> None:
        self.sd = None


def frame_systems(parts: Parts, size: int, steps: int, stream_batch: bool, variants: dict[str, Variant],
                  device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, object | str]:
    """name -> system, or -> the reason it is not measured (a string). variants: livestyle's rows."""
    systems: dict[str, object | str] = {
        name: LivestyleFrames(parts, size, steps, stream_batch, v, device, dtype) for name, v in variants.items()}
    systems["StreamDiffusion"] = (StreamDiffusionFrames(parts, size, steps, stream_batch, device, dtype)
                                  if installed("streamdiffusion") else "not installed")
    if not stream_batch or steps == 1:  # diffusers has no stream batch: its row is the per-frame one
        systems["diffusers img2img"] = (DiffusersFrames(parts, size, steps, device, dtype)
                                        if installed("diffusers") else "not installed")
    return systems
