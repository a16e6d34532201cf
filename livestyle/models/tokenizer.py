"""CLIP's byte-level BPE tokenizer, as Stable Diffusion 1.x/2.x use it.

Text -> token ids in four steps, matching `transformers.CLIPTokenizer`:

1. Special tokens (bos, eos, and pad when it is a different string, such as SD2's
   "!") written literally in the prompt are split out first and map to their ids.
2. Each remaining piece is NFC-normalised and lower-cased character by character,
   then cut into words by CLIP's pattern: contractions, runs of letters, single
   digits, runs of other non-space characters. Whitespace only separates words.
3. Each word's UTF-8 bytes are mapped to printable characters (`bytes_to_unicode`),
   "</w>" marks the word's end, and BPE merges are applied lowest rank first.
4. `__call__` wraps the ids as bos + ids + eos + pad, truncated to max_length.

This is the behaviour of the `tokenizers`-backed CLIPTokenizer (transformers >= 5,
and CLIPTokenizerFast before it). The old pure-Python CLIPTokenizer of
transformers 4 differs on rare inputs: it puts spaces around every CJK character
and drops control characters. OpenAI's CLIP also runs ftfy and html.unescape,
which neither transformers tokenizer does without ftfy.

Bundled vocabulary: `clip_bpe.txt.gz` is `open_clip/bpe_simple_vocab_16e6.txt.gz`
from the open-clip-torch 3.3.0 wheel (MIT License, Copyright (c) 2012-2021 Gabriel
Ilharco, Mitchell Wortsman, Nicholas Carlini, Rohan Taori, Achal Dave, Vaishaal
Shankar, John Miller, Hongseok Namkoong, Hannaneh Hajishirzi, Ali Farhadi, Ludwig
Schmidt), itself OpenAI CLIP's file (MIT License, Copyright (c) 2021 OpenAI). It is
the merge list that SD 1.x (openai/clip-vit-large-patch14) and SD 2.x (OpenCLIP
ViT-H/14) both use; single-file checkpoints carry no tokenizer.
"""

from __future__ import annotations

import gzip
import json
import unicodedata
from functools import lru_cache
from pathlib import Path

import regex

from livestyle.errors import CheckpointError

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"
BUNDLED_BPE = Path(__file__).with_name("clip_bpe.txt.gz")

# CLIP's word pattern (transformers' CLIPTokenizer, without its two special-token
# alternatives: literal special tokens are split out before this runs, and a
# special token that only appears after lower-casing, e.g. "<|ENDOFTEXT|>", is cut
# into "<|", "endoftext", "|>" by the byte-level step upstream, which is what this
# pattern does on its own).
WORD_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")


@lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """Map each of the 256 byte values to a printable unicode character.

    Printable Latin-1 bytes map to themselves; the rest (controls, space, ...) map
    to chr(256 + n) in order, so BPE never sees whitespace or control characters.
    Insertion order (printable bytes first) is the order of CLIP's first 256 vocab ids.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + n)
            n += 1
    return chars


def bundled_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Build CLIP's vocabulary (49408 entries) and merges from the bundled file.

    Exactly as OpenAI CLIP does: skip the header line, keep 49152 - 256 - 2 merges;
    vocab = 256 byte chars, the same with "</w>", one entry per merge, then
    <|startoftext|> (49406) and <|endoftext|> (49407).
    """
    with gzip.open(BUNDLED_BPE, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = list(bytes_to_unicode().values())
    words = byte_chars + [c + END_OF_WORD for c in byte_chars] + ["".join(m) for m in merges]
    words += [BOS, EOS]
    return {w: i for i, w in enumerate(words)}, merges


class Tokenizer:
    """CLIP BPE tokenizer: text -> token ids (ints in [0, vocab_size)).

    Args:
        vocab: token string -> id; must hold "<|startoftext|>", "<|endoftext|>" and pad_token.
        merges: BPE merge pairs, highest priority first.
        pad_token: "<|endoftext|>" for SD 1.x, "!" (id 0) for SD 2.x.
    """

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str = EOS):
        for token in (BOS, EOS, pad_token):
            if token not in vocab:
                raise CheckpointError(f"tokenizer vocabulary has no {token!r} token")
        self.vocab = vocab
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.bos_id = vocab[BOS]
        self.eos_id = vocab[EOS]
        self.pad_id = vocab[pad_token]
        self.unk_id = vocab[EOS]  # CLIP's unk token is <|endoftext|>
        self.byte_chars = bytes_to_unicode()
        # Strings that are matched verbatim in the raw text, longest first so that
        # "<|endoftext|>" wins over a shorter one starting at the same place.
        specials = sorted({BOS, EOS, pad_token}, key=len, reverse=True)
        self.special_pattern = regex.compile("|".join(regex.escape(s) for s in specials))
        self._bpe_cache: dict[str, list[int]] = {}

    # ---- construction -------------------------------------------------------

    @classmethod
    def from_files(cls, vocab_json: Path, merges_txt: Path, pad_token: str = EOS) -> Tokenizer:
        """Read a Hugging Face `vocab.json` + `merges.txt` pair."""
        try:
            vocab = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
            lines = Path(merges_txt).read_text(encoding="utf-8").split("\n")
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read tokenizer files {vocab_json}, {merges_txt}: {e}") from e
        if lines and lines[0].startswith("#version"):
            lines = lines[1:]
        merges = []
        for line in lines:
            pair = line.split()
            if len(pair) == 2:
                merges.append((pair[0], pair[1]))
            elif pair:
                raise CheckpointError(f"{merges_txt}: merge line {line!r} is not two symbols")
        return cls(vocab, merges, pad_token)

    @classmethod
    def from_folder(cls, path: Path) -> Tokenizer:
        """Read a diffusers `tokenizer/` folder: vocab.json + merges.txt (or tokenizer.json),
        and the pad token from special_tokens_map.json or tokenizer_config.json."""
        path = Path(path)
        pad_token = EOS
        for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the latter wins
            file = path / name
            if file.is_file():
                pad = json.loads(file.read_text(encoding="utf-8")).get("pad_token")
                if isinstance(pad, dict):  # {"content": "!", "lstrip": false, ...}
                    pad = pad.get("content")
                if isinstance(pad, str):
                    pad_token = pad
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            return cls.from_files(path / "vocab.json", path / "merges.txt", pad_token)
        if (path / "tokenizer.json").is_file():  # what transformers 5 writes instead
            return cls.from_tokenizer_json(path / "tokenizer.json", pad_token)
        raise CheckpointError(f"tokenizer folder {path} has neither vocab.json + merges.txt nor tokenizer.json")

    @classmethod
    def from_tokenizer_json(cls, file: Path, pad_token: str = EOS) -> Tokenizer:
        """Read the BPE model of a Hugging Face `tokenizer.json` (the "fast" format)."""
        try:
            model = json.loads(Path(file).read_text(encoding="utf-8"))["model"]
            vocab, raw_merges = model["vocab"], model["merges"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"cannot read tokenizer file {file}: {e}") from None
        # Merges are "a b" strings in older files and [a, b] pairs in newer ones.
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in raw_merges]
        if any(len(m) != 2 for m in merges):
            raise CheckpointError(f"{file}: a BPE merge is not two symbols")
        return cls(vocab, merges, pad_token)

    @classmethod
    def bundled(cls, pad_token: str = EOS) -> Tokenizer:
        """CLIP's vocabulary shipped with livestyle (for single-file checkpoints)."""
        vocab, merges = bundled_vocab_and_merges()
        return cls(vocab, merges, pad_token)

    # ---- encoding -----------------------------------------------------------

    def bpe(self, word: str) -> list[int]:
        """Ids of one word (already byte-mapped), "</w>" attached to its last symbol."""
        if word in self._bpe_cache:
            return self._bpe_cache[word]
        symbols = list(word[:-1]) + [word[-1] + END_OF_WORD]
        while len(symbols) > 1:
            pairs = zip(symbols[:-1], symbols[1:])
            best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            # Merge every non-overlapping occurrence of the best pair, left to right.
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        ids = [self.vocab.get(s, self.unk_id) for s in symbols]
        if len(self._bpe_cache) > 50_000:  # bounded: prompts are typed live for hours
            self._bpe_cache.clear()
        self._bpe_cache[word] = ids
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        # Per-character lower() like the Rust normaliser: no final-sigma rule.
        text = "".join(c.lower() for c in unicodedata.normalize("NFC", text))
        ids = []
        for word in WORD_PATTERN.findall(text):
            ids += self.bpe("".join(self.byte_chars[b] for b in word.encode("utf-8")))
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without bos/eos/padding; any length."""
        ids, start = [], 0
        for m in self.special_pattern.finditer(text):
            ids += self._encode_plain(text[start : m.start()])
            ids.append(self.vocab[m.group(0)])
            start = m.end()
        return ids + self._encode_plain(text[start:])

    def wrap(self, ids: list[int], max_length: int = 77) -> list[int]:
        """bos + ids (truncated to max_length - 2) + eos + pad up to max_length."""
        ids = [self.bos_id] + ids[: max_length - 2] + [self.eos_id]
        return ids + [self.pad_id] * (max_length - len(ids))

    def __call__(self, text: str, max_length: int = 77) -> list[int]:
        """Exactly `CLIPTokenizer(text, padding="max_length", max_length=max_length,
        truncation=True).input_ids`: a list of max_length ids."""
        return self.wrap(self.encode(text), max_length)
