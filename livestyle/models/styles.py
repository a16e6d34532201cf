"""Learned styles: the demo model's stand-in for a text prompt.

The demo U-Net is conditioned through cross-attention exactly as an SD U-Net is by
CLIP text features, but instead of a text encoder each style is a learned
embedding of T tokens x D dims (textual-inversion-like, Gal et al. 2022,
arXiv:2208.01618, learned jointly with the U-Net). A StyleBank holds S of them:

    bank.context("ink")                         -> (1, T, D), the U-Net's `context`
    bank.context({"ink": 0.7, "pastel": 0.3})   -> (1, T, D), a linear blend
    bank(indices (B,) int64)                    -> (B, T, D), for training batches

On disk: one safetensors file (`styles/styles.safetensors` in the demo folder) with
the tensor "embeddings" (S, T, D) and the style names, in order, as a JSON list in
the file's metadata under "names".
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from livestyle.errors import CheckpointError, LivestyleError
from livestyle.models.checkpoint import read_header, read_safetensors


class StyleBank(nn.Module):
    """S named styles, each a (T, D) embedding: `embeddings` is an (S, T, D) parameter.

    StyleBank(names, embeddings (S, T, D)) takes the tensor as its initial value;
    `StyleBank.random` draws one, `StyleBank.load` reads a file.
    """

    def __init__(self, names: Sequence[str], embeddings: torch.Tensor):
        super().__init__()
        names = tuple(names)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"StyleBank needs one or more non-empty style names, got {names!r}")
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"StyleBank: style names must be unique; repeated: {', '.join(twice)}")
        if embeddings.ndim != 3 or embeddings.shape[0] != len(names) or 0 in embeddings.shape:
            raise ValueError(f"StyleBank: embeddings must be ({len(names)} styles, tokens, dim), "
                             f"got shape {tuple(embeddings.shape)}")
        if not embeddings.is_floating_point():
            raise ValueError(f"StyleBank: embeddings must be floating point, got {embeddings.dtype}")
        self.names = names
        self.embeddings = nn.Parameter(embeddings)

    @classmethod
    def random(cls, names: Sequence[str], tokens: int = 8, dim: int = 64, std: float = 1.0,
               generator: torch.Generator | None = None) -> StyleBank:
        """Embeddings drawn from N(0, std^2); std 1 is nn.Embedding's init and about the
        scale of CLIP's final-layer-normed text features."""
        return cls(names, torch.randn(len(tuple(names)), tokens, dim, generator=generator) * std)

    @property
    def tokens(self) -> int:
        """T, the context length each style gives the U-Net."""
        return self.embeddings.shape[1]

    @property
    def dim(self) -> int:
        """D, the U-Net's cross_attention_dim."""
        return self.embeddings.shape[2]

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        """The row of style `name`; LivestyleError listing the known names for an unknown one."""
        try:
            return self.names.index(name)
        except ValueError:
            raise LivestyleError(f"unknown style {name!r}; this model has: {', '.join(self.names)}") from None

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B,) int64 -> contexts (B, T, D) (differentiable, for training)."""
        return self.embeddings[indices]

    def context(self, style: str | Mapping[str, float]) -> torch.Tensor:
        """The U-Net context (1, T, D) of one style name, or of a {name: weight} blend.

        A blend is linear in the embeddings with the weights normalised to sum to 1
        ({"a": 2, "b": 2} is the midpoint of a and b). Weights must be >= 0 with a
        positive sum. Computed once per style change, not per frame.
        """
        if isinstance(style, str):
            i = self.index(style)
            return self.embeddings[i : i + 1]  # (1, T, D)
        if not isinstance(style, Mapping) or not style:
            raise LivestyleError(f"a style is a name or a non-empty {{name: weight}} table, got {style!r}")
        rows = [self.index(name) for name in style]
        weights = [float(w) for w in style.values()]
        if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            raise LivestyleError(f"style weights must be >= 0 with a positive sum, got {dict(style)}")
        w = torch.tensor(weights, dtype=torch.float64) / sum(weights)
        w = w.to(device=self.embeddings.device, dtype=self.embeddings.dtype)
        return torch.einsum("s,std->td", w, self.embeddings[rows])[None]  # (S', T, D) -> (1, T, D)

    # -- Files -------------------------------------------------------------------------

    def save(self, path: str | Path, dtype: torch.dtype | None = None) -> None:
        """Write `embeddings` (in `dtype`, default its own) and the names to a safetensors file."""
        embeddings = self.embeddings.detach().to("cpu", dtype or self.embeddings.dtype, copy=True).contiguous()
        if not torch.isfinite(embeddings).all():
            raise ValueError(f"StyleBank.save: embeddings are not all finite in {embeddings.dtype}")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file({"embeddings": embeddings}, str(path), metadata={"names": json.dumps(list(self.names))})

    @classmethod
    def load(cls, path: str | Path, device="cpu", dtype=torch.float32) -> StyleBank:
        """A StyleBank from a file written by `save`; CheckpointError naming what is wrong."""
        path = Path(path)
        header = read_header(path)  # validates the file before safetensors parses it
        info = header.get("embeddings")
        if info is None or len(info.shape) != 3:
            found = f"an 'embeddings' tensor of shape {info.shape}" if info else f"tensors {sorted(header)[:3]}"
            raise CheckpointError(f"{path}: not a style bank: expected 'embeddings' (styles, tokens, dim), "
                                  f"found {found}")
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        try:
            names = json.loads(metadata["names"])
        except (KeyError, json.JSONDecodeError):
            raise CheckpointError(f"{path}: not a style bank: no JSON list of style names in its metadata "
                                  "('names')") from None
        if not isinstance(names, list) or len(names) != info.shape[0]:
            count = len(names) if isinstance(names, list) else type(names).__name__
            raise CheckpointError(f"{path}: style bank holds {info.shape[0]} embeddings but its metadata "
                                  f"names {count}")
        embeddings = read_safetensors(path)["embeddings"].to(device=device, dtype=dtype)
        try:
            return cls(names, embeddings)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
