"""The Triton kernels against their plain-torch references, over odd shapes and every dtype.

Without CUDA the kernels run in Triton's interpreter on CPU tensors, which needs
TRITON_INTERPRET=1 before triton is first imported (triton.language's own helpers are
made for one mode at import). A process that imported triton without it (a whole test
session: diffusers imports triton) skips this module; test_kernels.py then runs it in a
child process with the variable set. With CUDA the kernels are compiled and run on the GPU.

Shapes are odd and small: channels not a multiple of the block, H*W odd, batch 1 and 7,
a group longer than one tile (so the tiles' statistics are merged).

Tolerances: fp32 outputs may differ from torch's by reduction order only (atol = rtol =
1e-5). Low-precision outputs are judged against the fp32 reference on the same rounded
inputs: the kernels compute in fp32 and round once at the store. A GPU rounds to nearest
(half an ulp), Triton's interpreter truncates bf16 (under one ulp); so rtol is one ulp
relative to the value, 2**-7 in bf16 and 2**-10 in fp16, with a small atol for the fp32
reduction order near zero.
"""

import json
import os
import sys

import pytest
import torch

from livestyle import kernels
from livestyle.kernels import reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    if "triton" in sys.modules:
        pytest.skip("triton was imported without TRITON_INTERPRET=1 in this process; "
                    "test_kernels.py::test_parity_in_triton_s_interpreter runs this file in a child process",
                    allow_module_level=True)
    # Nothing imported triton yet: the interpreter can still be chosen for this whole process
    # (the only Triton code a process without CUDA runs is ours).
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2**-7, 1e-4), torch.float16: (2**-10, 1e-4)}  # rtol, atol


@pytest.fixture(scope="module")
def triton_kernels():
    """The Triton backend in force for this module."""
    previous = kernels.backend()
    kernels.set_backend("triton")
    yield
    kernels.set_backend(previous)


def close(out, ref, dtype):
    rtol, atol = TOLERANCE[dtype]
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=rtol, atol=atol)


def rand(*shape, dtype=torch.float32, seed=0):
    """Standard normal values on DEVICE, rounded to `dtype`."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)



GROUP_SHAPES = [  # (B, C, H, W, groups)
    (1, 12, 7, 5, 3),     # 4 channels a group, 35 positions
    (7, 40, 5, 3, 8),     # batch 7, 5 channels a group
    (2, 12, 23, 29, 3),   # 2668 elements a group: two tiles of 2048, merged
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", GROUP_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_group_norm_silu_with_shift_matches_reference(triton_kernels, shape, channels_last, dtype):
    B, C, H, W, G = shape
    x = rand(B, C, H, W, dtype=dtype) * 3 + 1  # a mean and a spread far from 0 and 1
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight, bias, shift = rand(C, dtype=dtype, seed=1), rand(C, dtype=dtype, seed=2), rand(B, C, dtype=dtype, seed=3)
    out = kernels.group_norm(x, weight, bias, G, 1e-5, "silu", shift)
    ref = reference.group_norm(x.float(), weight.float(), bias.float(), G, 1e-5, "silu", shift.float())
    close(out, ref, dtype)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("activation", [None, "relu"])
def test_group_norm_other_activations_and_no_affine(triton_kernels, activation):
    x = rand(3, 20, 9, 11)
    weight, bias = rand(20, seed=1), rand(20, seed=2)
    for w, b in ((weight, bias), (None, None)):
        out = kernels.group_norm(x, w, b, 4, 1e-6, activation)
        torch.testing.assert_close(out, reference.group_norm(x, w, b, 4, 1e-6, activation), rtol=1e-5, atol=1e-5)


def test_group_norm_of_a_constant_group_is_the_bias(triton_kernels):
    """Variance 0: rstd = 1/sqrt(eps), no NaN; every output is the bias (two-pass statistics give exactly 0)."""
    x = torch.full((1, 4, 3, 5), 7.25, device=DEVICE)
    bias = torch.tensor([1.0, -2.0, 3.0, 0.5], device=DEVICE)
    out = kernels.group_norm(x, torch.ones(4, device=DEVICE), bias, 2, 1e-5)
    assert torch.equal(out, bias[None, :, None, None].expand_as(out))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 35, 40), (7, 3, 320), (2, 1, 1)], ids=lambda s: "x".join(map(str, s)))
def test_layer_norm_matches_reference(triton_kernels, shape, dtype):
    D = shape[-1]
    x = rand(*shape, dtype=dtype) * 2 - 3
    weight, bias = rand(D, dtype=dtype, seed=1), rand(D, dtype=dtype, seed=2)
    out = kernels.layer_norm(x, weight, bias, 1e-5)
    close(out, reference.layer_norm(x.float(), weight.float(), bias.float(), 1e-5), dtype)
    no_affine = kernels.layer_norm(x, None, None, 1e-5)
    close(no_affine, reference.layer_norm(x.float(), None, None, 1e-5), dtype)


def test_layer_norm_reads_a_strided_input(triton_kernels):
    x = rand(5, 48).t()  # (48, 5), not contiguous
    torch.testing.assert_close(kernels.layer_norm(x, None, None), reference.layer_norm(x, None, None))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 35, 2 * 40), (7, 3, 2 * 1280)], ids=lambda s: "x".join(map(str, s)))
def test_geglu_matches_reference(triton_kernels, shape, dtype):
    """D = 1280 (SD's widest) spans two column blocks of 1024."""
    h = rand(*shape, dtype=dtype) * 2
    close(kernels.geglu(h), reference.geglu(h.float()), dtype)


def test_each_triton_kernel_has_its_references_signature():
    import inspect

    for name, module in kernels._load_triton().items():
        assert inspect.signature(getattr(module, name)) == inspect.signature(getattr(reference, name)), name


def test_geglu_gates_with_the_second_half():
    """diffusers' order: `hidden_states, gate = proj(x).chunk(2, dim=-1)`; gelu(0) = 0 kills a row."""
    h = torch.cat([torch.ones(1, 3), torch.zeros(1, 3)], dim=-1)  # first half 1, gate 0
    assert torch.equal(reference.geglu(h), torch.zeros(1, 3))


def test_geglu_refuses_an_odd_width(triton_kernels):
    with pytest.raises(ValueError, match="must be even"):
        kernels.geglu(rand(2, 7))


def test_tiny_unet_step_with_triton_kernels_matches_torch(triton_kernels):
    """A whole U-Net step (random weights, two levels, temporal cache on) through the kernels vs the
    reference: GroupNorm(+SiLU, + time embedding), LayerNorm, GEGLU, the cached attention with
    the ring empty, then one of its two slots filled, and the fused sampler step after the U-Net."""
    from livestyle.models.temporal import TemporalCache
    from livestyle.models.unet import UNet, UNetConfig

    torch.manual_seed(0)
    config = UNetConfig(block_out_channels=(8, 16), layers_per_block=1, attention_levels=(True, False),
                        num_heads=(2, 2), cross_attention_dim=12, norm_num_groups=4)
    unet = UNet(config).to(DEVICE).eval()
    x, t, context = rand(1, 4, 7, 5), torch.tensor([500.0]), rand(1, 3, 12, seed=1)
    noise, coeffs = rand(1, 4, 7, 5, seed=2), torch.tensor([[1.2], [-0.9], [0.8], [0.6]], device=DEVICE)
    outputs = {}
    with torch.no_grad():
        for name in ("torch", "triton"):
            kernels.set_backend(name)
            cache = TemporalCache.for_unet(unet, batch=1, latent_hw=(7, 5), frames=2)
            for frame in range(2):  # the second frame attends to the first through the cache
                out = unet(x + frame, t, context, cache)
                cache.advance()
            outputs[name] = (out, *kernels.sampler_step(x, out, noise, coeffs))
    for got, expected in zip(outputs["triton"], outputs["torch"]):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_tiny_unet_temporal_cache_through_the_triton_kernel_matches_torch(triton_kernels, monkeypatch):
    """The U-Net's cached self-attention through the Triton kernel (the ring read in place)
    against the torch path, while the ring fills (no slot, one of two, both: unmasked), and
    through a TemporalBatch of a stream's cache and a row with no bank. The norms and GEGLU
    take the reference here (the test above runs them through Triton): in the interpreter
    they would make this test take a minute."""
    from livestyle.models.temporal import TemporalBatch, TemporalCache
    from livestyle.models.unet import UNet, UNetConfig

    torch.manual_seed(0)
    config = UNetConfig(block_out_channels=(8, 16), layers_per_block=1, attention_levels=(True, False),
                        num_heads=(2, 2), cross_attention_dim=12, norm_num_groups=4)
    unet = UNet(config).to(DEVICE).eval()
    t, context = torch.tensor([500.0]), rand(2, 3, 12, seed=1)
    xs = [rand(2, 4, 7, 5, seed=10 + f) for f in range(3)]
    kernel = kernels._load_triton()["cached_attention"]
    calls = []
    real = kernel.cached_attention
    monkeypatch.setattr(kernel, "cached_attention", lambda *args: calls.append(args[5]) or real(*args))
    for name in ("group_norm", "layer_norm", "geglu"):
        monkeypatch.setattr(kernels, name, getattr(reference, name))
    outputs = {}
    with torch.no_grad():
        for name in ("torch", "triton"):
            kernels.set_backend(name)
            cache = TemporalCache.for_unet(unet, batch=2, latent_hw=(7, 5), frames=2)
            stream = TemporalCache.for_unet(unet, batch=1, latent_hw=(7, 5), frames=2)
            for f, x in enumerate(xs):
                outputs[name, "cache", f] = unet(x, t, context, cache)
                outputs[name, "batch", f] = unet(x, t, context, TemporalBatch([(stream, 1), (None, 1)]))
                cache.advance()
                stream.advance()
    kernels.set_backend("triton")
    layers = len(unet.self_attention_shapes((7, 5)))
    assert len(calls) == 3 * 3 * layers  # triton only: per frame, one call per layer for the cache, two for the batch
    # None: both full rings at the third frame, and the row with no bank at every frame
    assert sum(filled is None for filled in calls) == (2 + 3) * layers
    for key in [k[1:] for k in outputs if k[0] == "torch"]:
        torch.testing.assert_close(outputs[("triton", *key)], outputs[("torch", *key)], rtol=1e-4, atol=1e-4)


# Attention: p (the softmax weights) is rounded to the input dtype before the product with
# the values, as in flash attention, so each weight is off by up to half an ulp and the
# output (a weighted mean of values of size ~1 here) by a few of them: atol = rtol = 2**-9
# in fp16, 2**-6 in bf16. Triton 3.9's interpreter multiplies bf16 dot operands as their
# raw uint16 bits (Interpreter.create_dot), so bf16 is checked on CUDA only.
ATTENTION_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
ATTENTION_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2**-9, torch.bfloat16: 2**-6}
ATTENTION_CASES = [  # (B, L, C, heads, filled slots)
    (2, 35, 16, 2, [True, False, True]),  # some slots empty
    (1, 99, 80, 2, [False, False]),       # nothing banked yet; 99 tokens: two blocks of 64; head width 40
    (7, 13, 40, 5, [True]),               # batch 7, one full slot
]


@pytest.mark.parametrize("dtype", ATTENTION_DTYPES)
@pytest.mark.parametrize("case", ATTENTION_CASES,
                         ids=lambda c: "x".join(map(str, c[:4])) + f"-{sum(c[4])}of{len(c[4])}")
def test_cached_attention_matches_reference(triton_kernels, case, dtype):
    B, L, C, heads, filled = case
    N = len(filled)
    q, k, v = (rand(B, L, C, dtype=dtype, seed=s) for s in range(3))
    bank_k, bank_v = (rand(B, N, L, C, dtype=dtype, seed=s) for s in (3, 4))
    filled = torch.tensor(filled, device=DEVICE)
    out = kernels.cached_attention(q, k, v, bank_k, bank_v, filled, heads)
    ref = reference.cached_attention(q.float(), k.float(), v.float(), bank_k.float(), bank_v.float(), filled, heads)
    tol = ATTENTION_TOLERANCE[dtype]
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cached_attention_with_flags_per_row_matches_reference(triton_kernels, dtype):
    """filled (B, N): rows whose rings sit at different fill levels (TemporalRings while streams
    join), one of them with no slot filled; batch 3, 20 tokens, head width 8."""
    B, L, C, heads = 3, 20, 16, 2
    filled = torch.tensor([[True, False, True], [False, False, False], [True, True, True]], device=DEVICE)
    q, k, v = (rand(B, L, C, dtype=dtype, seed=s) for s in range(3))
    bank_k, bank_v = (rand(B, 3, L, C, dtype=dtype, seed=s) for s in (3, 4))
    out = kernels.cached_attention(q, k, v, bank_k, bank_v, filled, heads)
    ref = reference.cached_attention(q.float(), k.float(), v.float(), bank_k.float(), bank_v.float(), filled, heads)
    tol = ATTENTION_TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    for row in range(B):  # each row as if alone with its ring's flags
        alone = reference.cached_attention(q[row:row + 1].float(), k[row:row + 1].float(), v[row:row + 1].float(),
                                           bank_k[row:row + 1].float(), bank_v[row:row + 1].float(), filled[row],
                                           heads)
        torch.testing.assert_close(ref[row:row + 1], alone)
    with pytest.raises(ValueError, match=r"filled must be \(N,\) or \(B, N\) = \(3,\) or \(3, 3\), got \(2, 3\)"):
        kernels.cached_attention(q, k, v, bank_k, bank_v, filled[:2], heads)


def test_cached_attention_reference_with_flags_per_row_is_what_temporal_rings_computes():
    """The oracle for (B, N) flags: TemporalRings' masked read (a dense per-row mask through SDPA)."""
    from livestyle.models.temporal import TemporalRings

    R, L, C, heads = 3, 6, 8, 2
    rings = TemporalRings([(L, C)], rows=R, frames=2)
    rings.keys[0].copy_(rand(R, 2, L, C, seed=3))
    rings.values[0].copy_(rand(R, 2, L, C, seed=4))
    rings.filled.copy_(torch.tensor([[True, False], [False, False], [True, True]]))
    rings.masked = True
    q, k, v = (rand(R, L, C, seed=s).cpu() for s in range(3))
    expected = reference.cached_attention(q, k, v, rings.keys[0].clone(), rings.values[0].clone(),
                                          rings.filled.clone(), heads)
    torch.testing.assert_close(rings.attend(0, q, k, v, heads), expected)


def test_cached_attention_reads_a_rows_view_of_an_fp32_bank(triton_kernels):
    """A TemporalCache.rows() view (batch stride of the whole bank) in fp32 under fp16 queries."""
    B, L, C, N = 3, 10, 32, 2
    bank_k, bank_v = (rand(B, N, L, C, seed=s) for s in (3, 4))
    q, k, v = (rand(1, L, C, dtype=torch.float16, seed=s) for s in range(3))
    filled = torch.tensor([True, True], device=DEVICE)
    out = kernels.cached_attention(q, k, v, bank_k[1:2], bank_v[1:2], filled, 4)
    ref = reference.cached_attention(q.float(), k.float(), v.float(), bank_k[1:2].half().float(),
                                     bank_v[1:2].half().float(), filled, 4)
    torch.testing.assert_close(out.float(), ref, rtol=2**-9, atol=2**-9)


def test_cached_attention_reference_is_what_the_unet_attention_computes():
    """The oracle: reference.cached_attention on a TemporalCache's bank equals the cache's
    concatenation and mask through scaled_dot_product_attention (unet.Attention's path)."""
    from livestyle.models.temporal import TemporalCache

    B, L, C, heads = 2, 6, 8, 2
    cache = TemporalCache([(L, C)], batch=B, frames=3)
    for frame in range(2):  # two of three slots filled
        cache.extend_and_store(0, rand(B, L, C, seed=10 + frame), rand(B, L, C, seed=20 + frame))
        cache.advance()
    q, k, v = (rand(B, L, C, seed=s) for s in range(3))
    bank_k, bank_v, filled = cache.keys[0].clone(), cache.values[0].clone(), cache.filled.clone()
    k_all, v_all, mask = cache.extend_and_store(0, k, v)
    split = lambda t: t.view(B, -1, heads, C // heads).transpose(1, 2)  # noqa: E731
    expected = torch.nn.functional.scaled_dot_product_attention(split(q), split(k_all), split(v_all), attn_mask=mask)
    expected = expected.transpose(1, 2).reshape(B, L, C)
    torch.testing.assert_close(reference.cached_attention(q, k, v, bank_k, bank_v, filled, heads), expected)


def test_taef2_pool_branch_with_triton_kernels_matches_torch(triton_kernels):
    """TAEF2's pooled Blocks (GroupNorm + ReLU through the kernels) vs the reference, random weights."""
    from livestyle.models.taesd import TinyAutoencoder

    torch.manual_seed(0)
    model = TinyAutoencoder(latent_channels=32, encoder_pooled=frozenset({1, 3})).to(DEVICE).eval()
    image = rand(1, 3, 24, 40).sigmoid()
    outputs = {}
    with torch.no_grad():
        for name in ("torch", "triton"):
            kernels.set_backend(name)
            outputs[name] = model.encode(image)
    kernels.set_backend("triton")
    torch.testing.assert_close(outputs["triton"], outputs["torch"], rtol=1e-4, atol=1e-4)


# -- frames in and out ------------------------------------------------------------------------
# frame_in: fp32 within 1e-5 of the reference (the kernel interpolates in the same order;
# the resize's weights differ from torch's by rounding only); fp16/bf16 within one ulp,
# as the norms. frame_out: bytes equal to the reference's, exactly, including the ties.

FRAME_CASES = [  # (B, H, W, (h, w)): same size, down, up, batch 7
    (1, 9, 13, (9, 13)),
    (2, 9, 13, (5, 7)),
    (1, 9, 13, (17, 30)),
    (7, 3, 5, (4, 3)),
]


def frames(B, H, W, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, H, W, 3), dtype=torch.uint8, generator=g).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("signed", [False, True], ids=["unit", "signed"])
@pytest.mark.parametrize("case", FRAME_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-to-{c[3][0]}x{c[3][1]}")
def test_frame_in_matches_reference(triton_kernels, case, signed, dtype):
    B, H, W, size = case
    rgb = frames(B, H, W)
    out = kernels.frame_in(rgb, size, signed, dtype)
    assert out.shape == (B, 3, *size) and out.is_contiguous()
    close(out, reference.frame_in(rgb, size, signed, torch.float32), dtype)
    if size == (H, W) and dtype == torch.float32:  # no resize: exactly v / 255 (and 2 v / 255 - 1)
        assert torch.equal(out, reference.frame_in(rgb, size, signed, dtype))


def test_frame_in_reference_is_what_frame_to_tensor_gives():
    """The oracle agrees with livestyle.frame.to_tensor, the engine's path before the kernel."""
    from livestyle.frame import to_tensor

    rgb = frames(2, 5, 7).cpu()
    torch.testing.assert_close(reference.frame_in(rgb, (5, 7), False, torch.float32), to_tensor(list(rgb.numpy())))


def _exact_ties() -> torch.Tensor:
    """fp32 x with x * 255 exactly k + 0.5 in fp32, for k = 0 .. 254 where one exists (about half of them)."""
    ties = []
    for k in range(255):
        x = torch.tensor((k + 0.5) / 255, dtype=torch.float32)
        for candidate in (x, torch.nextafter(x, torch.tensor(0.0)), torch.nextafter(x, torch.tensor(1.0))):
            if (candidate * 255).item() == k + 0.5:
                ties.append(candidate.item())
                break
    return torch.tensor(ties)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("signed", [False, True], ids=["unit", "signed"])
@pytest.mark.parametrize("shape", [(1, 3, 7, 5), (7, 3, 3, 11)], ids=lambda s: "x".join(map(str, s)))
def test_frame_out_matches_reference_exactly(triton_kernels, shape, signed, dtype):
    x = rand(*shape, dtype=dtype) * 0.7 + (0.0 if signed else 0.5)  # some values clamped at both ends
    out = kernels.frame_out(x, signed)
    assert out.dtype == torch.uint8 and out.shape == (shape[0], *shape[2:], 3) and out.is_contiguous()
    assert torch.equal(out, reference.frame_out(x, signed))


def test_frame_out_rounds_ties_to_even(triton_kernels):
    ties = _exact_ties()
    assert len(ties) > 50
    x = ties[: len(ties) // 3 * 3].reshape(1, 3, 1, -1).to(DEVICE)  # (1, 3, 1, n)
    out = kernels.frame_out(x, False)
    expected = (x * 255).round()  # half to even: 0.5 -> 0, 1.5 -> 2
    assert torch.equal(out, expected.to(torch.uint8).permute(0, 2, 3, 1))
    assert torch.equal(out, reference.frame_out(x, False))
    assert (expected.flatten() % 2 == 0).all()


# -- flow-guided propagation ------------------------------------------------------------------
# fp32 within 1e-5: the kernel follows the flow in pixels, the reference through
# grid_sample's [-1, 1] normalisation and back (coordinates apart by ~1e-7 of the width,
# times the previous frame's gradient, values ~1 here). fp16/bf16: one ulp, as the norms.

PROPAGATE_CASES = [  # (B, C, h, w, fh, fw): flow grid smaller (upsampled), larger (downsampled), batch 7
    (1, 4, 9, 11, 5, 6),
    (2, 3, 6, 7, 13, 10),
    (7, 4, 5, 3, 5, 3),
]


def motion(B, fh, fw, seed=5):
    """A backward flow of a few pixels, reaching past the borders, and a confidence in [0, 1]."""
    back = rand(B, 2, fh, fw, seed=seed) * 2.5
    confidence = rand(B, 1, fh, fw, seed=seed + 1).sigmoid()
    return back, confidence


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", PROPAGATE_CASES, ids=lambda c: "x".join(map(str, c[:4])) + f"-flow{c[4]}x{c[5]}")
def test_propagate_matches_reference(triton_kernels, case, dtype):
    B, C, h, w, fh, fw = case
    current, previous = rand(B, C, h, w, dtype=dtype, seed=1), rand(B, C, h, w, dtype=dtype, seed=2)
    back, confidence = motion(B, fh, fw)
    blend = torch.linspace(0.3, 0.95, B, device=DEVICE)
    out = kernels.propagate(current, previous, back, confidence, blend)
    close(out, reference.propagate(current.float(), previous.float(), back, confidence, blend), dtype)


def test_propagate_with_blend_zero_returns_current_exactly(triton_kernels):
    current, previous = rand(2, 4, 6, 5, dtype=torch.float16, seed=1), rand(2, 4, 6, 5, dtype=torch.float16, seed=2)
    back, confidence = motion(2, 4, 4)
    blend = torch.tensor([0.0, 0.5], device=DEVICE)
    out = kernels.propagate(current, previous, back, confidence, blend)
    assert torch.equal(out[0], current[0]) and not torch.equal(out[1], current[1])
    assert torch.equal(reference.propagate(current, previous, back, confidence, blend)[0], current[0])


def test_propagate_reference_against_the_cpu_path_of_stream_flow():
    """stream.flow's CPU path (cv2.resize of the flow, sampling_grid, grid_sample) vs the reference.

    A latent larger than the flow grid: cv2's INTER_LINEAR and F.interpolate's bilinear both
    use half-pixel centres, so the two agree to float rounding. A latent smaller than the
    flow grid: the CPU path averages the flow over each target pixel's area (INTER_AREA),
    the reference (and the kernel) interpolate it bilinearly at the pixel's centre. At an
    exact 2x reduction (SD-Turbo at 512x512: a 128x128 flow grid, 64x64 latents) that is
    the same 2x2 average; at other ratios the two differ where the flow varies within a
    target pixel: on this flow of a few pixels, random per flow pixel, the outputs (values
    ~1) differ by ~0.15 on average, by up to ~1.
    """
    from livestyle.stream import flow

    def cpu_path(current, previous, back, confidence, blend):
        m = flow.Motion(back[0].permute(1, 2, 0).cpu().numpy(), confidence[0, 0].cpu().numpy())
        grid, conf = flow.sampling_grid(m, (current.shape[-1], current.shape[-2]), "cpu")
        return flow.propagate(current, previous, grid, conf, blend)

    current, previous = rand(1, 4, 12, 14, seed=1).cpu(), rand(1, 4, 12, 14, seed=2).cpu()
    blend = torch.tensor([0.8])
    for fh, fw in ((6, 7), (24, 28)):  # flow grid upsampled 2x; reduced exactly 2x
        back, confidence = (t.cpu() for t in motion(1, fh, fw))
        torch.testing.assert_close(cpu_path(current, previous, back, confidence, 0.8),
                                   reference.propagate(current, previous, back, confidence, blend),
                                   rtol=1e-4, atol=1e-4)
    back, confidence = (t.cpu() for t in motion(1, 20, 25))  # reduced 1.67x and 1.79x
    diff = (cpu_path(current, previous, back, confidence, 0.8)
            - reference.propagate(current, previous, back, confidence, blend)).abs()
    assert 0.05 < diff.mean() < 0.3 and diff.max() < 2, (diff.mean(), diff.max())


def test_bicubic_propagate_is_the_reference_on_every_backend_and_the_cpu_path(triton_kernels):
    """mode "bicubic" (TemporalSettings.warp): the switch runs the reference, grid_sample's
    bicubic, on any device (the Triton kernel samples bilinearly); stream.flow's CPU path
    (cv2.remap's bicubic) gives the same where the flow grid is upsampled."""
    from livestyle.stream import flow

    current, previous = rand(1, 4, 12, 14, seed=1), rand(1, 4, 12, 14, seed=2)
    back, confidence = motion(1, 6, 7)
    blend = torch.tensor([0.8], device=DEVICE)
    want = reference.propagate(current, previous, back, confidence, blend, "bicubic")
    assert torch.equal(kernels.propagate(current, previous, back, confidence, blend, "bicubic"), want)
    assert (want - reference.propagate(current, previous, back, confidence, blend)).abs().max() > 0.01
    m = flow.Motion(back[0].permute(1, 2, 0).cpu().numpy(), confidence[0, 0].cpu().numpy())
    grid, conf = flow.sampling_grid(m, (14, 12), "cpu")
    torch.testing.assert_close(flow.propagate(current.cpu(), previous.cpu(), grid, conf, 0.8, "bicubic"),
                               want.cpu(), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="nearest"):
        flow.propagate(current.cpu(), previous.cpu(), grid, conf, 0.8, "nearest")
    with pytest.raises(ValueError, match="bilinearly only"):  # the kernel is never handed a mode it lacks
        kernels._load_triton()["propagate"].propagate(current, previous, back, confidence, blend, "bicubic")


# -- sampler step -----------------------------------------------------------------------------
# fp32 within 2e-5: LCM's epsilon coefficients reach ~15 at t = 999 (1 / sqrt(alpha)), and
# a * x + b * out cancels them to values ~1, so fp32 rounding of the products is ~15 ulp
# of the result; the sampler's own path (x0 first, then c_skip x + c_out x0) rounds
# differently. fp16/bf16 outputs: one ulp of the fp32 result.


def lcm_coefficients(schedule, index):
    """(4, B) coefficients of the fused step for lcm_step at per-row `index` (B,)."""
    a = schedule.c_skip[index] + schedule.c_out[index] * schedule.x0_from_x[index]
    b = schedule.c_out[index] * schedule.x0_from_out[index]
    return torch.stack([a, b, schedule.sqrt_alpha_next[index], schedule.sqrt_one_minus_alpha_next[index]])


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_sampler_step_reproduces_lcm_step(triton_kernels, prediction):
    from livestyle.stream import samplers

    schedule = samplers.lcm_schedule([999, 759, 499, 259], samplers.alphas_cumprod(), prediction)
    index = torch.tensor([0, 1, 2, 3, 0, 3, 1])  # batch 7: rows at different steps, the last step among them
    x, out, noise = (rand(7, 4, 5, 3, seed=s) for s in range(3))
    expected = samplers.lcm_step(x, out, schedule.to(DEVICE), index.to(DEVICE), noise)
    got = kernels.sampler_step(x, out, noise, lcm_coefficients(schedule, index).to(DEVICE))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=2e-5, atol=2e-5)


def test_sampler_step_reproduces_bridge_step(triton_kernels):
    from livestyle.stream import samplers

    z, v = rand(2, 4, 7, 9, seed=1), rand(2, 4, 7, 9, seed=2)
    t_from, t_to = torch.tensor([0.0, 0.25], device=DEVICE), torch.tensor([0.5, 1.0], device=DEVICE)
    coeffs = torch.stack([torch.ones(2), (t_to - t_from).cpu(), torch.ones(2), torch.zeros(2)]).to(DEVICE)
    x_next, denoised = kernels.sampler_step(z, v, None, coeffs)
    expected = samplers.bridge_step(z, v, t_from, t_to)
    torch.testing.assert_close(x_next, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(x_next, denoised)  # c = 1, no noise


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("noisy", [True, False], ids=["noise", "no-noise"])
def test_sampler_step_matches_reference(triton_kernels, noisy, dtype):
    x, out, noise = (rand(7, 3, 5, 3, dtype=dtype, seed=s) for s in range(3))
    coeffs = rand(4, 7, seed=9)
    got = kernels.sampler_step(x, out, noise if noisy else None, coeffs)
    expected = reference.sampler_step(x.float(), out.float(), noise.float() if noisy else None, coeffs)
    for g, e in zip(got, expected):
        close(g, e, dtype)


def test_sampler_step_refuses_mismatched_shapes(triton_kernels):
    x = rand(2, 4, 3, 3)
    with pytest.raises(ValueError, match=r"^sampler_step: .*coeffs \(4, 3\)$"):
        kernels.sampler_step(x, x, None, rand(4, 3))


def test_tiny_kl_vae_with_triton_kernels_matches_torch(triton_kernels):
    """The KL VAE (random weights, two levels, odd size) encoding and decoding through the
    Triton GroupNorm(+SiLU) against the torch path: every norm of its resnets, attention and
    output goes through the kernel."""
    from livestyle.models.vae import KLAutoencoder, KLAutoencoderConfig

    torch.manual_seed(0)
    config = KLAutoencoderConfig(block_out_channels=(8, 12), layers_per_block=1, norm_num_groups=4)
    vae = KLAutoencoder(config).to(DEVICE).eval()
    image = rand(2, 3, 14, 10).sigmoid()
    kernel = kernels._load_triton()["group_norm"]
    calls = []
    real = kernel.group_norm
    outputs = {}
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernel, "group_norm", lambda *args: calls.append(args[5]) or real(*args))
        for name in ("torch", "triton"):
            kernels.set_backend(name)
            latents = vae.encode(image)
            outputs[name] = latents, vae.decode(latents)
    kernels.set_backend("triton")
    # SiLU: the encoder's 2 levels x 1 resnet x 2 norms, the mid block's 2 x 2, the output's 1 (9);
    # the decoder's mid 2 x 2, 2 levels x 2 resnets x 2, the output's 1 (13). None: each attention's norm.
    assert calls.count("silu") == 9 + 13 and calls.count(None) == 2
    for got, expected in zip(outputs["triton"], outputs["torch"]):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)



def test_the_benchmark_checks_every_kernel_in_smoke_mode(triton_kernels, tmp_path, capsys, monkeypatch):
    """benchmarks/kernels.py --smoke: a row per kernel shape, each Triton output checked (here in the
    interpreter, or on the GPU, briefly timed), the JSON written; a kernel that disagrees fails the run."""
    from benchmarks import kernels as bench

    args = ["--smoke", "--no-compile", "--no-unet", "--repeats", "1", "--dtype", "fp32"]
    assert bench.main([*args, "--json", str(tmp_path / "k.json")]) == 0
    report = json.loads((tmp_path / "k.json").read_text())
    assert {row["kernel"] for row in report["rows"]} == set(kernels.KERNELS) - {"cached_attention"} | {"attention"}
    assert all(row["check"] == "ok" for row in report["rows"]), report["rows"]
    if DEVICE == "cpu":
        assert report["triton_mode"] == "interpreter" and "not measured (no CUDA)" in capsys.readouterr().out
    monkeypatch.setattr(reference, "geglu", lambda h: h[..., : h.shape[-1] // 2])  # no gate: not GEGLU
    assert bench.main(args) == 1
    assert capsys.readouterr().out.splitlines()[-1].startswith("FAILED: 2 row(s) did not match the reference")
    kernels.set_backend("triton")
