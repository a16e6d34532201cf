"""Text side: CLIP tokenizer, text encoder, single-file conversion, checked against transformers."""

import json

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from livestyle.errors import CheckpointError
from livestyle.models.clip import TextEncoder, TextEncoderConfig
from livestyle.models.convert_clip import text_encoder_from_original, text_encoder_from_transformers
from livestyle.models.tokenizer import BOS, EOS, Tokenizer, bundled_vocab_and_merges, bytes_to_unicode

SD1_PAD, SD2_PAD = "<|endoftext|>", "!"

AWKWARD_PROMPTS = [
    "a photo of a cat",
    "café naïve Ångström",
    "一只猫在屋顶上",
    "🐱🔥 fire cat 🔥🔥🔥",
    "!!!??? ... ,,, a,b;c",
    "1920x1080 8k 3.14159",
    "don't it's we're I'M they'LL",
    "  multiple   spaces\nnew\n\nlines\ttabs\r\n",
    '<p class="x">hi &amp; bye</p>',
    "",
    "   ",
    "UPPER CASE Mixed",
    "masterpiece, best quality, " * 20,  # over 77 tokens: truncated
    "hello!",  # SD 2.x: "!" is its pad token, split out as id 0 like upstream
    "a <|endoftext|> b <|startoftext|>",
    "ΟΔΟΣ İstanbul Straße",
    "x\x00y\u200bz\u3000w",
]


def write_vocab(folder, vocab: dict, merges: list) -> tuple:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder / "vocab.json", folder / "merges.txt"


@pytest.fixture(scope="module")
def bundled_files(tmp_path_factory):
    """The bundled vocabulary written out as a Hugging Face vocab.json + merges.txt."""
    vocab, merges = bundled_vocab_and_merges()
    return write_vocab(tmp_path_factory.mktemp("clip_vocab"), vocab, merges)


# ---- tokenizer ----------------------------------------------------------------------


def test_bundled_vocab_is_clips():
    vocab, merges = bundled_vocab_and_merges()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab[BOS] == 49406 and vocab[EOS] == 49407
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["a</w>"] == 320
    assert sorted(bytes_to_unicode()) == list(range(256))


@pytest.mark.parametrize("pad", [SD1_PAD, SD2_PAD])
def test_bundled_tokenizer_matches_transformers(bundled_files, pad):
    ours = Tokenizer.bundled(pad_token=pad)
    ref = CLIPTokenizer(*map(str, bundled_files), pad_token=pad)
    from_files = Tokenizer.from_files(*bundled_files, pad_token=pad)
    for text in AWKWARD_PROMPTS:
        expected = ref(text, padding="max_length", max_length=77, truncation=True).input_ids
        assert ours(text) == expected, text
        assert from_files(text) == expected, text
        assert ours.encode(text) == ref(text, add_special_tokens=False).input_ids, text
    assert ours("a")[3] == (49407 if pad == SD1_PAD else 0)
    assert len(ours("word " * 200)) == 77 and ours("word " * 200)[-1] == 49407


def tiny_vocab():
    """Byte characters, a handful of merges and the special tokens (~530 entries)."""
    merges = [("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>"), ("l", "l"), ("e", "ll"),
              ("h", "ell"), ("hell", "o</w>"), ("!", "!"), ("!!", "!</w>"), ("a", "n"), ("an", "d</w>")]
    chars = list(bytes_to_unicode().values())
    words = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    return {w: i for i, w in enumerate(words)}, merges


@pytest.mark.parametrize("pad", [SD1_PAD, SD2_PAD])
def test_from_files_matches_transformers_on_tiny_vocab(tmp_path, pad):
    vocab, merges = tiny_vocab()
    files = write_vocab(tmp_path, vocab, merges)
    ours = Tokenizer.from_files(*files, pad_token=pad)
    ref = CLIPTokenizer(*map(str, files), pad_token=pad)
    for text in ["the cat and hello", "Hello!!! THE CAT", "the hell cat...", "ça", "", "cat " * 50]:
        expected = ref(text, padding="max_length", max_length=16, truncation=True).input_ids
        assert ours(text, max_length=16) == expected, text
    assert ours.encode("the cat") == [vocab["the</w>"], vocab["cat</w>"]]


def test_from_folder_reads_pad_token(tmp_path):
    vocab, merges = tiny_vocab()
    write_vocab(tmp_path / "sd1", vocab, merges)
    (tmp_path / "sd1" / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))
    write_vocab(tmp_path / "sd2", vocab, merges)
    (tmp_path / "sd2" / "tokenizer_config.json").write_text(
        json.dumps({"pad_token": {"content": "!", "lstrip": False}, "model_max_length": 77}))
    assert Tokenizer.from_folder(tmp_path / "sd1")("cat")[-1] == vocab[EOS]
    assert Tokenizer.from_folder(tmp_path / "sd2")("cat")[-1] == vocab["!"] == 0
    with pytest.raises(CheckpointError, match="merges.txt"):
        (tmp_path / "sd2" / "merges.txt").unlink()
        Tokenizer.from_folder(tmp_path / "sd2")


# ---- text encoder -------------------------------------------------------------------


def tiny_clip(act: str, hidden=32, heads=4, layers=3, vocab=1000, seed=0) -> CLIPTextModel:
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden + 5,
                         num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                         hidden_act=act, layer_norm_eps=1e-5, attn_implementation="eager",
                         bos_token_id=0, eos_token_id=2, pad_token_id=1)
    model = CLIPTextModel(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorms and biases
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def saved_state(model: CLIPTextModel) -> dict:
    """The state dict as SD checkpoints store it (transformers 4 names: `text_model.*`;
    transformers 5 drops that prefix in memory and on save)."""
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in model.state_dict().items()}


def ours_from(model: CLIPTextModel) -> TextEncoder:
    encoder = TextEncoder(TextEncoderConfig.from_transformers(model.config.to_dict())).eval()
    encoder.load_state_dict(saved_state(model), strict=True)
    return encoder


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_text_encoder_matches_transformers(act):
    ref = tiny_clip(act)
    ours = ours_from(ref)
    assert ours.config.hidden_act == act
    ids = torch.randint(0, 1000, (2, 77))
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        for skip in (0, 1, 2):  # diffusers' clip_skip: hidden_states[-(skip + 1)] + final LN
            final_ln = getattr(ref, "text_model", ref).final_layer_norm  # transformers 4 | 5
            expected = final_ln(out.hidden_states[-(skip + 1)])
            if skip == 0:
                assert torch.equal(expected, out.last_hidden_state)
            got = ours(ids, skip_layers=skip)
            assert got.shape == (2, 77, 32)
            assert (got - expected).abs().max() <= 1e-4, skip
        short = ids[:, :10]  # causal: a prefix gives the same states
        assert (ours(short) - ref(short).last_hidden_state).abs().max() <= 1e-4
    with pytest.raises(ValueError):
        ours(ids, skip_layers=3)


def test_text_encoder_loads_position_ids_buffer():
    ref = tiny_clip("quick_gelu")
    state = saved_state(ref)
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None].float() * 0.999  # a broken one
    ours = TextEncoder(TextEncoderConfig.from_transformers(ref.config.to_dict())).eval()
    ours.load_state_dict(state, strict=True)
    ids = torch.randint(0, 1000, (1, 77))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).last_hidden_state).abs().max() <= 1e-4
    with pytest.raises(RuntimeError):  # other stray keys still fail strict loading
        ours.load_state_dict({**state, "text_model.extra": torch.zeros(1)}, strict=True)


def test_config_validation():
    with pytest.raises(CheckpointError, match="hidden_act"):
        TextEncoderConfig(hidden_act="relu")
    with pytest.raises(CheckpointError, match="num_hidden_layers"):
        TextEncoderConfig.from_transformers({"vocab_size": 10, "hidden_size": 8})


def test_transformers_layouts_both_load():
    ref = tiny_clip("gelu")
    v4 = saved_state(ref)
    v5 = {k.removeprefix("text_model."): v for k, v in v4.items()}
    v4["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    for sd in (v4, v5):
        state = text_encoder_from_transformers(sd)
        assert state.keys() == ours_from(ref).state_dict().keys()


# ---- single-file conversion ---------------------------------------------------------


def to_openclip(model: CLIPTextModel, extra_block: bool = True) -> dict:
    """transformers CLIPTextModel -> SD 2.x's OpenCLIP layout (`model.*`), plus one
    extra final resblock and the contrastive head, as SD 2.x files hold them."""
    sd = saved_state(model)
    D = model.config.hidden_size
    n = model.config.num_hidden_layers
    out = {
        "model.token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "model.positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "model.ln_final.weight": sd["text_model.final_layer_norm.weight"],
        "model.ln_final.bias": sd["text_model.final_layer_norm.bias"],
        "model.text_projection": torch.randn(D, D),
        "model.logit_scale": torch.tensor(4.6),
    }
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for i in range(n + extra_block):
        src = f"text_model.encoder.layers.{min(i, n - 1)}."
        dst = f"model.transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = torch.cat([sd[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out[f"{dst}attn.in_proj_{kind}"] = torch.randn_like(qkv) if i == n else qkv
            for a, b in names.items():
                value = sd[f"{src}{a}.{kind}"]
                out[f"{dst}{b}.{kind}"] = torch.randn_like(value) if i == n else value
    return out


def test_sd2_openclip_conversion():
    ref = tiny_clip("gelu", hidden=128, heads=2, layers=2)  # 64-d heads, as ViT-H
    state, config = text_encoder_from_original(to_openclip(ref))
    assert config == TextEncoderConfig.from_transformers(ref.config.to_dict())
    assert config.num_hidden_layers == 2 and config.hidden_act == "gelu"
    ours = TextEncoder(config).eval()
    ours.load_state_dict(state, strict=True)
    ids = torch.randint(0, 1000, (2, 77))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).last_hidden_state).abs().max() <= 1e-4


def test_sd1_conversion():
    ref = tiny_clip("quick_gelu", hidden=128, heads=2, layers=2)
    ids = torch.randint(0, 1000, (1, 77))
    full = {"transformer." + k: v for k, v in saved_state(ref).items()}
    full["transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    short = {k.replace("transformer.text_model.", "transformer."): v for k, v in full.items()}
    for original in (full, short):  # some files lack the `text_model.` level
        state, config = text_encoder_from_original(original)
        assert config == TextEncoderConfig.from_transformers(ref.config.to_dict())
        ours = TextEncoder(config).eval()
        ours.load_state_dict(state, strict=True)
        with torch.no_grad():
            assert (ours(ids) - ref(ids).last_hidden_state).abs().max() <= 1e-4


def test_conversion_errors():
    ref = tiny_clip("gelu", hidden=128, heads=2, layers=2)
    with pytest.raises(CheckpointError, match="unknown text encoder layout"):
        text_encoder_from_original({"conditioner.embedders.0.transformer.x": torch.zeros(1)})
    broken = to_openclip(ref)
    del broken["model.transformer.resblocks.0.mlp.c_fc.bias"]
    with pytest.raises(CheckpointError, match="mlp.fc1.bias"):
        text_encoder_from_original(broken)
    odd = {"transformer." + k: v for k, v in saved_state(ref).items()}
    odd["transformer.text_model.encoder.layers.0.mlp.fc1.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match="shape"):
        text_encoder_from_original(odd)
