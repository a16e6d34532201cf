"""Prompt text -> text-encoder embeddings, with A1111-style attention weights and long prompts.

Weights (AUTOMATIC1111 stable-diffusion-webui, modules/prompt_parser.py,
parse_prompt_attention):
    (word)      x 1.1            ((word))  x 1.21      (word:1.3)  x 1.3
    [word]      / 1.1            nesting multiplies
    \\( \\) \\[ \\] \\\\   literal characters
    an unmatched "(" or "[" weights everything after it; a stray ")" or "]" is text
    BREAK       (upper case, a word on its own) ends the current 75-token chunk

Long prompts (modules/sd_hijack_clip.py): the weighted text is tokenized piece by
piece, the tokens are cut into chunks of 75, each chunk is encoded on its own as
bos + up to 75 tokens + eos + padding = 77 ids, and the (1, 77, D)
results are concatenated along the sequence: (1, 77 * chunks, D). Weighted chunks
are scaled per token and then rescaled to their original mean, as A1111's default
"Original" emphasis does. Not reproduced: A1111's comma back-tracking (moving the
words after a comma near a chunk's end into the next chunk) and textual-inversion
embeddings.

SDXL (`encode_prompt_sdxl`) runs the same chunks through both of its encoders, weights
each encoder's states as above (A1111 weights each embedder on its own), and puts them
side by side on the feature axis (768 + 1280 = 2048), as diffusers'
StableDiffusionXLPipeline.encode_prompt does; the pooled embedding is the second
encoder's for the first chunk, unweighted (A1111 and ComfyUI take it so).

Embeddings are meant to be computed once per prompt change, never per frame:
`PromptCache` / `SDXLPromptCache` keep the last few.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass

import torch

from livestyle.models.clip import TextEncoder
from livestyle.models.tokenizer import Tokenizer

CHUNK = 75  # tokens per chunk: 77 positions minus bos and eos
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
BREAK = ("BREAK", -1.0)  # the chunk-break marker in parse_weights' output (A1111's form)

# A1111's tokens, in match order: escapes, brackets, ":weight)" closing a round
# bracket, plain closers, runs of ordinary text, a lone ":".
_ATTENTION = re.compile(
    r"""
    \\\(|\\\)|\\\[|\\]|\\\\|\\|
    \(|\[|
    :\s*([+-]?[.\d]+)\s*\)|
    \)|]|
    [^\\()\[\]:]+|
    :
    """,
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_weights(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) pieces, A1111's rules; runs of equal weight merged.

    >>> parse_weights("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    >>> parse_weights("(unbalanced")
    [('unbalanced', 1.1)]
    >>> parse_weights("a BREAK b")
    [('a', 1.0), ('BREAK', -1.0), ('b', 1.0)]

    An empty prompt gives [("", 1.0)]. A "(text:w)" whose w is not a number (e.g.
    "(a:1.2.3)") is kept as text rather than raising, so a half-typed prompt in a
    live session still encodes.
    """
    res: list[list] = []  # [text, weight, is_break]; weights multiplied as brackets close
    round_opens: list[int] = []  # index into res where each open bracket started
    square_opens: list[int] = []

    def multiply_from(start: int, multiplier: float) -> None:
        for piece in res[start:]:
            if not piece[2]:
                piece[1] *= multiplier

    def add_text(piece: str) -> None:
        for i, part in enumerate(_BREAK.split(piece)):
            if i > 0:
                res.append([*BREAK, True])
            res.append([part, 1.0, False])

    for m in _ATTENTION.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            res.append([token[1:], 1.0, False])
        elif token == "(":
            round_opens.append(len(res))
        elif token == "[":
            square_opens.append(len(res))
        elif weight is not None and round_opens and _is_number(weight):
            multiply_from(round_opens.pop(), float(weight))
        elif token == ")" and round_opens:
            multiply_from(round_opens.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_opens:
            multiply_from(square_opens.pop(), SQUARE_MULTIPLIER)
        else:
            add_text(token)
    for start in round_opens:  # unmatched opens weight the rest of the prompt
        multiply_from(start, ROUND_MULTIPLIER)
    for start in square_opens:
        multiply_from(start, SQUARE_MULTIPLIER)

    merged: list[list] = []
    for piece in res:
        if merged and not piece[2] and not merged[-1][2] and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(piece, w) for piece, w, _ in merged] or [("", 1.0)]


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def chunk_tokens(tokenizer: Tokenizer, text: str) -> tuple[list[list[int]], list[list[float]]]:
    """Token ids and per-token weights of a prompt, in chunks of 77.

    Each chunk is bos + up to 75 tokens + eos + pad, as the tokenizer itself pads
    (SD 1.x: eos again; SD 2.x: "!" = 0), so a prompt of <= 75 tokens gives exactly
    `tokenizer(text)`. bos/eos/pad positions have weight 1.0. There is always at
    least one chunk; BREAK closes the current chunk early.
    Returns (ids, weights): k lists of 77 ints, k lists of 77 floats.
    """
    ids: list[list[int]] = []
    weights: list[list[float]] = []
    chunk: list[int] = []
    chunk_weights: list[float] = []

    def close_chunk() -> None:
        nonlocal chunk, chunk_weights
        ids.append(tokenizer.wrap(chunk, CHUNK + 2))  # bos + chunk + eos + pad: 77 ids
        weights.append([1.0] + chunk_weights + [1.0] * (CHUNK + 1 - len(chunk)))
        chunk, chunk_weights = [], []

    for piece, weight in parse_weights(text):
        if (piece, weight) == BREAK:
            close_chunk()
            continue
        for token in tokenizer.encode(piece):
            if len(chunk) == CHUNK:
                close_chunk()
            chunk.append(token)
            chunk_weights.append(weight)
    if chunk or not ids:
        close_chunk()
    return ids, weights


@torch.no_grad()
def encode_prompt(text_encoder: TextEncoder, tokenizer: Tokenizer, text: str,
                  skip_layers: int = 0) -> torch.Tensor:
    """Prompt -> U-Net context, A1111's weighting and long-prompt chunking.

    skip_layers: see TextEncoder.forward (1 = A1111's "CLIP skip 2").
    Returns (1, 77 * k, D) in the encoder's dtype and device, k >= 1 chunks. An
    unweighted prompt of <= 75 tokens gives exactly text_encoder(tokenizer(text)).
    No autograd graph is kept.
    """
    ids, weights = chunk_tokens(tokenizer, text)
    z = text_encoder(torch.tensor(ids, device=_device(text_encoder)), skip_layers)  # (k, 77, D)
    return _emphasis(z, weights)


@dataclass(frozen=True)
class SDXLPrompt:
    """SDXL's conditioning from one prompt: the U-Net's `context` and `text_embeds`.

    context: (1, 77 * k, D1 + D2), both encoders' penultimate states side by side
        (768 + 1280 = 2048 for SDXL), k >= 1 chunks.
    pooled: (1, P), the second encoder's projected end-of-text state (P = 1280),
        what the U-Net takes as `text_embeds`.
    """

    context: torch.Tensor
    pooled: torch.Tensor


@torch.no_grad()
def encode_prompt_sdxl(text_encoder: TextEncoder, tokenizer: Tokenizer, text_encoder_2: TextEncoder,
                       tokenizer_2: Tokenizer, text: str, skip_layers: int = 1) -> SDXLPrompt:
    """Prompt -> SDXL's context and pooled embedding, A1111's weighting and chunking.

    text_encoder: CLIP ViT-L; text_encoder_2: OpenCLIP ViT-bigG with its projection.
    skip_layers: 1 = hidden_states[-2], SDXL's own (diffusers' clip_skip=None); no final
    LayerNorm on either, as SDXL trained. An unweighted prompt of <= 75 tokens gives
    exactly diffusers' StableDiffusionXLPipeline.encode_prompt (prompt_embeds,
    pooled_prompt_embeds). Returned in the encoders' dtype and device; no autograd graph.
    """
    ids, weights = chunk_tokens(tokenizer, text)
    ids_2, weights_2 = chunk_tokens(tokenizer_2, text)
    if len(ids) != len(ids_2):  # the same BPE vocabulary in both (pads differ): same chunks
        raise ValueError(f"SDXL's tokenizers cut the prompt into {len(ids)} and {len(ids_2)} chunks; "
                         "they must share one vocabulary")
    z = text_encoder(torch.tensor(ids, device=_device(text_encoder)), skip_layers, final_norm=False)
    z_2, pooled = text_encoder_2.encode_with_pooled(torch.tensor(ids_2, device=_device(text_encoder_2)),
                                                    skip_layers)
    # (1, 77k, D1) and (1, 77k, D2) -> (1, 77k, D1 + D2)
    context = torch.cat([_emphasis(z, weights), _emphasis(z_2, weights_2).to(z.device, z.dtype)], dim=-1)
    return SDXLPrompt(context, pooled[:1])


def _device(text_encoder: TextEncoder) -> torch.device:
    return text_encoder.text_model.embeddings.token_embedding.weight.device


def _emphasis(z: torch.Tensor, weights: list[list[float]]) -> torch.Tensor:
    """(k, 77, D) chunk states and their per-token weights -> (1, 77 * k, D)."""
    chunks = []
    for i, chunk_weights in enumerate(weights):
        zi = z[i]  # (77, D)
        if any(w != 1.0 for w in chunk_weights):  # decided on the host: no device sync
            # A1111's "Original" emphasis: scale each token's embedding by its weight,
            # then restore the chunk's mean, which keeps overall magnitude steady.
            w = torch.tensor(chunk_weights, device=z.device, dtype=zi.dtype)
            original_mean = zi.mean()
            zi = zi * w[:, None]
            zi = zi * (original_mean / zi.mean())
        chunks.append(zi)
    return torch.cat(chunks)[None]  # (1, 77 * k, D)


class PromptCache:
    """Remembers the embeddings of the last few prompts, so a prompt is encoded once
    when it changes (and switching back to an earlier one is free), never per frame.

    cache(text) -> (1, 77 * k, D) tensor, as encode_prompt.
    """

    def __init__(self, text_encoder: TextEncoder, tokenizer: Tokenizer,
                 skip_layers: int = 0, max_entries: int = 16):
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.skip_layers = skip_layers
        self.max_entries = max_entries
        self._entries: OrderedDict[str, torch.Tensor | SDXLPrompt] = OrderedDict()

    def __call__(self, text: str):
        if text in self._entries:
            self._entries.move_to_end(text)
            return self._entries[text]
        z = self._encode(text)
        self._entries[text] = z
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)  # least recently used
        return z

    def _encode(self, text: str) -> torch.Tensor:
        return encode_prompt(self.text_encoder, self.tokenizer, text, self.skip_layers)

    def clear(self) -> None:
        """Forget everything, e.g. after the text encoder's weights changed (LoRA)."""
        self._entries.clear()


class SDXLPromptCache(PromptCache):
    """PromptCache for SDXL's two encoders: cache(text) -> SDXLPrompt, as encode_prompt_sdxl."""

    def __init__(self, text_encoder: TextEncoder, tokenizer: Tokenizer, text_encoder_2: TextEncoder,
                 tokenizer_2: Tokenizer, skip_layers: int = 1, max_entries: int = 16):
        super().__init__(text_encoder, tokenizer, skip_layers, max_entries)
        self.text_encoder_2 = text_encoder_2
        self.tokenizer_2 = tokenizer_2

    def _encode(self, text: str) -> SDXLPrompt:
        return encode_prompt_sdxl(self.text_encoder, self.tokenizer, self.text_encoder_2, self.tokenizer_2,
                                  text, self.skip_layers)
