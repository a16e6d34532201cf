"""A1111 prompt weighting and long prompts: parse_weights, chunk_tokens, encode_prompt."""

import pytest
import torch

from livestyle.models.clip import TextEncoder, TextEncoderConfig
from livestyle.models.prompt import BREAK, PromptCache, chunk_tokens, encode_prompt, parse_weights
from livestyle.models.tokenizer import Tokenizer


@pytest.mark.parametrize("text, expected", [
    # A1111's own docstring examples (modules/prompt_parser.py)
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", [
        ("a ", 1.0), ("house", 1.3 * 1.1 * 1.1), (" ", 1.1), ("on", 1.0), (" a ", 1.1),
        ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)]),
    # the brief's cases and edges
    ("a (very beautiful) girl", [("a ", 1.0), ("very beautiful", 1.1), (" girl", 1.0)]),
    ("((word))", [("word", 1.1 * 1.1)]),
    ("(a:1.3) b", [("a", 1.3), (" b", 1.0)]),
    ("[a] (b:0.5) c", [("a", 1 / 1.1), (" ", 1.0), ("b", 0.5), (" c", 1.0)]),
    ("[[a]]", [("a", 1 / 1.1 / 1.1)]),
    ("( a : 2 )", [(" a ", 2.0)]),
    ("a (unbalanced", [("a ", 1.0), ("unbalanced", 1.1)]),
    ("b)", [("b)", 1.0)]),
    ("x] y", [("x] y", 1.0)]),
    ("a:b", [("a:b", 1.0)]),
    ("(a:1.2.3) b", [("a:1.2.3) b", 1.1)]),  # not a number: text (A1111 would raise)
    ("\\\\", [("\\", 1.0)]),
    ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), BREAK, ("b", 1.1)]),
    ("BREAKFAST", [("BREAKFAST", 1.0)]),
    ("", [("", 1.0)]),
])
def test_parse_weights(text, expected):
    got = parse_weights(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


@pytest.fixture(scope="module")
def text_model():
    """A tiny random CLIP (the real 49408-token vocabulary) and the bundled tokenizer."""
    torch.manual_seed(0)
    cfg = TextEncoderConfig(vocab_size=49408, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=3, num_attention_heads=4, hidden_act="quick_gelu")
    encoder = TextEncoder(cfg).eval()
    with torch.no_grad():  # a nonzero mean, like real embeddings, so mean restoring matters
        encoder.text_model.final_layer_norm.bias.add_(0.3)
    return encoder, Tokenizer.bundled()


def plain(encoder, tokenizer, text, skip=0):
    with torch.no_grad():
        return encoder(torch.tensor([tokenizer(text)]), skip_layers=skip)


def test_unweighted_prompt_is_the_plain_encoding(text_model):
    encoder, tokenizer = text_model
    for text in ["a photo of a cat", "", "masterpiece, best quality, 1girl"]:
        for skip in (0, 1):
            z = encode_prompt(encoder, tokenizer, text, skip_layers=skip)
            assert z.shape == (1, 77, 32)
            assert torch.equal(z, plain(encoder, tokenizer, text, skip))


def test_weights_of_one_change_nothing(text_model):
    encoder, tokenizer = text_model
    reference = encode_prompt(encoder, tokenizer, "a photo of a cat")
    assert torch.equal(encode_prompt(encoder, tokenizer, "a photo of a (cat:1.0)"), reference)
    assert torch.equal(encode_prompt(encoder, tokenizer, "a (photo:1) of a cat"), reference)


def test_weighted_token_follows_a1111(text_model):
    encoder, tokenizer = text_model
    z = encode_prompt(encoder, tokenizer, "a photo of a (cat:1.5)")
    base = plain(encoder, tokenizer, "a photo of a cat")[0]  # (77, D); "cat" is token 5
    assert not torch.allclose(z[0], base)
    weights = torch.ones(77, 1)
    weights[5] = 1.5
    expected = base * weights
    expected = expected * (base.mean() / expected.mean())
    assert (z[0] - expected).abs().max() <= 1e-6
    assert z[0].mean() == pytest.approx(base.mean().item(), rel=1e-5)  # mean restored
    # the weight is where the word is: token 5 scaled by ~1.5 relative to the others
    ratio = (z[0] / base)
    assert ratio[5].mean() == pytest.approx(1.5 * ratio[4].mean().item(), rel=1e-4)


def test_long_prompt_is_chunked(text_model):
    encoder, tokenizer = text_model
    text = "word " * 100  # one token each
    ids, weights = chunk_tokens(tokenizer, text)
    assert [len(c) for c in ids] == [77, 77] and [len(w) for w in weights] == [77, 77]
    word = tokenizer.encode("word")[0]
    assert ids[0] == [tokenizer.bos_id] + [word] * 75 + [tokenizer.eos_id]
    assert ids[1] == tokenizer(" ".join(["word"] * 25))
    z = encode_prompt(encoder, tokenizer, text)
    assert z.shape == (1, 154, 32)
    assert (z[:, 77:] - plain(encoder, tokenizer, " ".join(["word"] * 25))).abs().max() <= 1e-6
    assert encode_prompt(encoder, tokenizer, "word " * 75).shape == (1, 77, 32)  # exactly one chunk
    assert encode_prompt(encoder, tokenizer, "word " * 151).shape == (1, 231, 32)


def test_break_starts_a_new_chunk(text_model):
    encoder, tokenizer = text_model
    ids, _ = chunk_tokens(tokenizer, "a cat BREAK a dog")
    assert ids == [tokenizer("a cat"), tokenizer("a dog")]
    z = encode_prompt(encoder, tokenizer, "a cat BREAK a dog")
    assert z.shape == (1, 154, 32)


def test_sd2_padding_in_chunks():
    tokenizer = Tokenizer.bundled(pad_token="!")
    ids, weights = chunk_tokens(tokenizer, "a (cat:1.2)")
    assert ids == [tokenizer("a cat")] and ids[0][4:] == [0] * 73
    assert weights[0][:4] == [1.0, 1.0, 1.2, 1.0] and weights[0][4:] == [1.0] * 73


def test_prompt_cache(text_model):
    encoder, tokenizer = text_model
    cache = PromptCache(encoder, tokenizer, max_entries=2)
    a = cache("a cat")
    assert cache("a cat") is a
    cache("a dog")
    cache("a bird")  # evicts "a cat"
    assert cache("a cat") is not a and torch.equal(cache("a cat"), a)
