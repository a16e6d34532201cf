"""SDXL's two text encoders: parity with transformers and with diffusers' SDXL encode_prompt,
the single-file (open_clip) layout, prompt weighting and the cache."""

import json

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from livestyle.errors import CheckpointError
from livestyle.models.clip import TextEncoder, TextEncoderConfig
from livestyle.models.convert_clip import text_encoder_from_original, text_encoder_from_transformers
from livestyle.models.prompt import SDXLPromptCache, encode_prompt_sdxl
from livestyle.models.tokenizer import Tokenizer, bundled_vocab_and_merges
from random_weights import perturb

VOCAB = 49408  # CLIP's own vocabulary: the tokenizers are real, the encoders tiny


def tiny_encoders(seed: int = 0):
    """SDXL-shaped pair: a quick_gelu CLIP (ViT-L's kind) and a gelu CLIP with projection (bigG's kind)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, max_position_embeddings=77, layer_norm_eps=1e-5, attn_implementation="eager",
                  bos_token_id=49406, eos_token_id=2, pad_token_id=1)  # eos 2: SDXL's configs (argmax pooling)
    one = perturb(CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                                               num_attention_heads=4, hidden_act="quick_gelu", **common)), 1)
    two = perturb(CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=128, intermediate_size=67, num_hidden_layers=3, num_attention_heads=2,  # 64-d heads, as bigG
        hidden_act="gelu", projection_dim=48, **common)), 2)
    return one, two


def ours(model) -> TextEncoder:
    with_projection = isinstance(model, CLIPTextModelWithProjection)
    encoder = TextEncoder(TextEncoderConfig.from_transformers(model.config.to_dict(), with_projection)).eval()
    encoder.load_state_dict(text_encoder_from_transformers(model.state_dict()), strict=True)
    return encoder


def tokenizers(tmp_path):
    vocab, merges = bundled_vocab_and_merges()
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    files = (str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    # SDXL's tokenizer pads with the end-of-text token, tokenizer_2 with "!" (id 0)
    return (CLIPTokenizer(*files, model_max_length=77), CLIPTokenizer(*files, pad_token="!", model_max_length=77),
            Tokenizer.bundled(), Tokenizer.bundled(pad_token="!"))


@pytest.fixture(scope="module")
def sdxl_text(tmp_path_factory):
    one, two = tiny_encoders()
    tok, tok_2, our_tok, our_tok_2 = tokenizers(tmp_path_factory.mktemp("tok"))
    return one, two, tok, tok_2, ours(one), ours(two), our_tok, our_tok_2


def test_projection_encoder_matches_transformers(sdxl_text):
    _, two, _, _, _, ours_2, _, _ = sdxl_text
    ids = torch.randint(0, VOCAB - 1, (2, 77))
    ids[0, 9], ids[1, 40] = VOCAB - 1, VOCAB - 1  # the end-of-text token, pooled there
    with torch.no_grad():
        ref = two(ids, output_hidden_states=True)
        for skip in (0, 1, 2):
            hidden, pooled = ours_2.encode_with_pooled(ids, skip_layers=skip)
            assert (hidden - ref.hidden_states[-(skip + 1)]).abs().max() <= 1e-4, skip
            assert pooled.shape == (2, 48)
            assert (pooled - ref.text_embeds).abs().max() <= 1e-4
        assert (ours_2(ids) - ref.last_hidden_state).abs().max() <= 1e-4
        assert (ours_2(ids, skip_layers=1, final_norm=False) - ref.hidden_states[-2]).abs().max() <= 1e-4


def test_concatenation_matches_diffusers_encode_prompt(sdxl_text):
    one, two, tok, tok_2, ours_1, ours_2, our_tok, our_tok_2 = sdxl_text
    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=one, text_encoder_2=two, tokenizer=tok,
                                     tokenizer_2=tok_2, unet=None, scheduler=None)
    prompt = "a watercolor painting of a fox, soft light, café"
    with torch.no_grad():
        ref_context, _, ref_pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    got = encode_prompt_sdxl(ours_1, our_tok, ours_2, our_tok_2, prompt)
    assert got.context.shape == (1, 77, 32 + 128) and got.pooled.shape == (1, 48)
    assert (got.context - ref_context).abs().max() <= 1e-4
    assert (got.pooled - ref_pooled).abs().max() <= 1e-4


def test_weighting_and_long_prompts(sdxl_text):
    _, _, _, _, ours_1, ours_2, our_tok, our_tok_2 = sdxl_text
    plain = encode_prompt_sdxl(ours_1, our_tok, ours_2, our_tok_2, "a red fox in snow")
    weighted = encode_prompt_sdxl(ours_1, our_tok, ours_2, our_tok_2, "a (red:1.5) fox in snow")
    # each encoder's states weighted on their own (A1111's emphasis, its own mean), the pooled not at all
    w = torch.ones(77, 1)
    w[2] = 1.5  # bos, "a", "red"
    for part in (slice(0, 32), slice(32, None)):
        z = plain.context[0, :, part]
        expected = z * w * (z.mean() / (z * w).mean())
        assert torch.allclose(weighted.context[0, :, part], expected, atol=1e-5)
    assert torch.equal(weighted.pooled, plain.pooled)
    assert not torch.allclose(weighted.context, plain.context)
    long = encode_prompt_sdxl(ours_1, our_tok, ours_2, our_tok_2, "fox " * 100)  # 100 tokens: 2 chunks
    assert long.context.shape == (1, 154, 160)
    first = encode_prompt_sdxl(ours_1, our_tok, ours_2, our_tok_2, "fox " * 75)
    assert torch.allclose(long.context[:, :77], first.context, atol=1e-5)
    assert torch.allclose(long.pooled, first.pooled, atol=1e-5)  # the first chunk's


def test_cache_encodes_each_prompt_once(sdxl_text, monkeypatch):
    _, _, _, _, ours_1, ours_2, our_tok, our_tok_2 = sdxl_text
    cache = SDXLPromptCache(ours_1, our_tok, ours_2, our_tok_2, max_entries=2)
    calls = []
    real = ours_2.encode_with_pooled
    monkeypatch.setattr(ours_2, "encode_with_pooled", lambda *a, **k: calls.append(1) or real(*a, **k))
    a = cache("a fox")
    assert cache("a fox") is a and len(calls) == 1
    cache("a cat")
    cache("a dog")  # evicts "a fox"
    cache("a fox")
    assert len(calls) == 4


# ---- single-file layout ----------------------------------------------------------------


def to_openclip(model: CLIPTextModelWithProjection) -> dict:
    """transformers CLIPTextModelWithProjection -> open_clip's layout (`model.*`), as SDXL
    single files hold bigG under conditioner.embedders.1: the inverse of our conversion."""
    sd = text_encoder_from_transformers(model.state_dict())
    out = {
        "model.token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "model.positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "model.ln_final.weight": sd["text_model.final_layer_norm.weight"],
        "model.ln_final.bias": sd["text_model.final_layer_norm.bias"],
        "model.text_projection": sd["text_projection.weight"].T.contiguous(),  # (width, proj)
        "model.logit_scale": torch.tensor(4.6),
    }
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for i in range(model.config.num_hidden_layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"model.transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([sd[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for a, b in names.items():
                out[f"{dst}{b}.{kind}"] = sd[f"{src}{a}.{kind}"]
    return out


def test_openclip_bigg_layout_converts(sdxl_text):
    _, two, _, _, _, ours_2, _, _ = sdxl_text
    state, config = text_encoder_from_original(to_openclip(two), keep_last=True)
    assert config == ours_2.config  # every layer kept, the projection read from its shape
    converted = TextEncoder(config).eval()
    converted.load_state_dict(state, strict=True)
    ids = torch.randint(0, VOCAB, (1, 77))
    with torch.no_grad():
        for got, want in zip(converted.encode_with_pooled(ids), ours_2.encode_with_pooled(ids)):
            assert torch.equal(got, want)
    # SD 2.x's reading of the same file: the last block and the head dropped
    _, sd2 = text_encoder_from_original(to_openclip(two))
    assert sd2.num_hidden_layers == 2 and sd2.projection_dim is None


def test_projection_config_errors():
    with pytest.raises(CheckpointError, match="projection_dim"):
        TextEncoderConfig.from_transformers({"vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
                                             "num_hidden_layers": 1, "num_attention_heads": 1,
                                             "max_position_embeddings": 77}, with_projection=True)
