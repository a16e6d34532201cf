"""Temporal cache for the U-Net's self-attention: a fixed-shape feature bank of past frames.

After StreamV2V (Liang et al. 2024, "Looking Backward: Streaming Video-to-Video
Translation with Feature Banks"): each self-attention layer also attends to its own
keys and values from the last N frames, which ties the look of consecutive frames
together without any training.

Unlike a bank grown with torch.cat, every buffer here is allocated once, from the
U-Net, the latent size, the batch size and N (gpt-fast's KV cache is the model):

    keys[i], values[i]  (B, N, L_i, C_i)  layer i's ring of N frames; L_i = h_i * w_i tokens
    filled              (N,) bool         which ring slots hold a frame
    write_index         (1,) int64        the slot the current frame is written to

Slots never written are skipped by the attention (kernels.cached_attention: a per-slot
flag, or a mask in the reference) rather than cut off, so shapes never change, nothing
reads back to the host, and the whole step can be captured in a CUDA graph. Once every
slot is filled (counted on the host by `advance()`) no flags are handed over and the
attention runs unmasked; a captured graph holds one of the two, filling or full.
Batch rows are independent: row b only ever sees row b's past.

Per frame: U-Net forward (each self-attention layer reads `banks` into
kernels.cached_attention, then calls `store`), then `advance()`.

Optional feature fusion (StreamV2V's "dynamic feature fusion"): with `fusion` > 0 the
cache also banks each layer's attention output, and `fuse` pulls every output token
toward its most similar banked output token (cosine similarity above FUSION_THRESHOLD),
by `fusion`. Only layers of at most FUSION_MAX_TOKENS tokens take part: the low
resolutions, as StreamV2V fuses in the mid and first up blocks (the similarity matrix
grows with tokens squared).

`rows(start, stop)` is a view of some batch rows (one denoising slot of a stream run
step by step); `TemporalBatch` joins the caches of several streams, and rows that keep
no bank (a guidance row), into one object for one batched U-Net call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from livestyle import kernels

if TYPE_CHECKING:
    from livestyle.models.unet import UNet


FUSION_THRESHOLD = 0.98  # StreamV2V's: only a near-identical banked token is fused
FUSION_MAX_TOKENS = 1024  # layers with more tokens (finer than 32x32) are not fused

# What the attention reads per part of the batch: (rows of the batch, keys (b, N, L, C),
# values (b, N, L, C), filled (N,) bool or None when every slot holds a frame).
BankPart = tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor | None]


class TemporalCache:
    """Preallocated ring buffers of self-attention keys/values for the last `frames` frames."""

    def __init__(self, shapes: list[tuple[int, int]], batch: int, frames: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 fusion: float = 0.0):
        """shapes: (tokens, channels) per self-attention layer, indexed like Attention.layer_index.
        fusion: feature fusion strength in [0, 1); 0 banks no outputs."""
        if frames < 1:
            raise ValueError(f"TemporalCache needs at least 1 frame, got {frames}")
        if not 0.0 <= fusion < 1.0:
            raise ValueError(f"TemporalCache fusion must be in [0, 1), got {fusion}")
        self.frames = frames
        self.keys = [torch.zeros(batch, frames, L, C, device=device, dtype=dtype) for L, C in shapes]
        self.values = [torch.zeros(batch, frames, L, C, device=device, dtype=dtype) for L, C in shapes]
        self.fusion = fusion
        # outputs[i] (B, N, L, C) for the fused layers, None for the others
        self.outputs = [torch.zeros(batch, frames, L, C, device=device, dtype=dtype)
                        if fusion and L <= FUSION_MAX_TOKENS else None for L, C in shapes]
        self.filled = torch.zeros(frames, dtype=torch.bool, device=device)
        self.write_index = torch.zeros(1, dtype=torch.long, device=device)
        # advance() calls since the last reset(), on the host (a list: shared with rows() views);
        # it tells `banks` that every slot is filled without reading `filled` back.
        self._advances = [0]

    @classmethod
    def for_unet(cls, unet: UNet, batch: int, latent_hw: tuple[int, int], frames: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 fusion: float = 0.0) -> TemporalCache:
        """A cache for `unet` run on (batch, C, h, w) latents with latent_hw = (h, w)."""
        return cls(unet.self_attention_shapes(latent_hw), batch, frames, device, dtype, fusion)

    def banks(self, layer: int, k: torch.Tensor) -> list[BankPart]:
        """Layer `layer`'s ring as stored, for the current frame's keys k (B, L, C).

        Returns one part, (rows, keys, values, filled): rows = all of them; keys, values
        (B, N, L, C) the bank buffers themselves (views, nothing copied); filled (N,) bool,
        or None once every slot holds a frame (counted on the host, so asking costs no
        sync), which lets the attention run unmasked. Attention reads the bank, then calls
        `store`: a frame never attends to itself twice and the oldest frame is replaced.
        """
        bank_k, bank_v = self.keys[layer], self.values[layer]
        B, N, L, C = bank_k.shape
        if k.shape != (B, L, C):
            raise ValueError(f"TemporalCache layer {layer} holds (batch, tokens, channels) = {(B, L, C)}, "
                             f"got {tuple(k.shape)}: build the cache for this batch size and latent size")
        filled = None if self._advances[0] >= self.frames else self.filled
        return [(slice(None), bank_k, bank_v, filled)]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
        """unet.Attention's read: q, k, v (B, L, C) over themselves and the ring, then `store`. -> (B, L, C)."""
        (_, bank_k, bank_v, filled), = self.banks(layer, k)
        out = kernels.cached_attention(q, k, v, bank_k, bank_v, filled, heads)
        self.store(layer, k, v)
        return out

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the current frame's keys/values (B, L, C) of layer `layer` to slot `write_index`."""
        bank_k, bank_v = self.keys[layer], self.values[layer]
        # The slot index stays a device tensor: index_copy_ writes in place without a host sync.
        # Detached: the bank is state; no gradient flows into past frames.
        bank_k.index_copy_(1, self.write_index, k.detach()[:, None].to(bank_k.dtype))
        bank_v.index_copy_(1, self.write_index, v.detach()[:, None].to(bank_v.dtype))

    def extend_and_store(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """The bank as one concatenation and a mask, then `store`: the plain definition of what
        unet.Attention computes through `banks` and kernels.cached_attention (the tests' oracle).

        k, v: (B, L, C) of layer `layer` for the current frame.
        Returns k_all, v_all: (B, L + N*L, C), and mask: (1, L + N*L) bool, True where a key
        may be attended to (the current frame, and the slots filled by past frames).
        """
        (_, bank_k, bank_v, _), = self.banks(layer, k)
        B, N, L, C = bank_k.shape
        k_all = torch.cat([k, bank_k.view(B, N * L, C).to(k.dtype)], dim=1)  # (B, L + N*L, C)
        v_all = torch.cat([v, bank_v.view(B, N * L, C).to(v.dtype)], dim=1)
        valid_past = self.filled[:, None].expand(N, L).reshape(N * L)  # (N*L,)
        mask = torch.cat([torch.ones(L, dtype=torch.bool, device=k.device), valid_past])[None]  # (1, L + N*L)
        self.store(layer, k, v)  # after the read: torch.cat copied the bank
        return k_all, v_all, mask

    def fuse(self, layer: int, out: torch.Tensor) -> torch.Tensor:
        """The attention output of layer `layer` for the current frame, (B, L, C), with each
        token moved by `fusion` toward its nearest banked output token where their cosine
        similarity exceeds FUSION_THRESHOLD; then the output (as computed) is banked.
        Layers without an output bank return `out` unchanged."""
        bank = self.outputs[layer]
        if bank is None:
            return out
        B, N, L, C = bank.shape
        past = bank.view(B, N * L, C).to(out.dtype)
        sim = F.normalize(out, dim=-1) @ F.normalize(past, dim=-1).transpose(1, 2)  # (B, L, N*L)
        valid = self.filled[:, None].expand(N, L).reshape(N * L)  # (N*L,)
        sim = sim.masked_fill(~valid, -2.0)  # never-written slots are never nearest
        best, index = sim.max(dim=-1)  # (B, L)
        nearest = past.gather(1, index[..., None].expand(B, L, C))  # (B, L, C)
        weight = self.fusion * (best > FUSION_THRESHOLD).to(out.dtype)[..., None]  # (B, L, 1)
        bank.index_copy_(1, self.write_index, out.detach()[:, None].to(bank.dtype))
        return out + weight * (nearest - out)

    def rows(self, start: int, stop: int) -> TemporalCache:
        """A cache over batch rows [start, stop) that shares this one's buffers and ring
        position: writes through it land here; `advance()` on either moves both."""
        view = TemporalCache.__new__(TemporalCache)
        view.frames = self.frames
        view.keys = [k[start:stop] for k in self.keys]
        view.values = [v[start:stop] for v in self.values]
        view.fusion = self.fusion
        view.outputs = [o[start:stop] if o is not None else None for o in self.outputs]
        view.filled, view.write_index, view._advances = self.filled, self.write_index, self._advances
        return view

    def advance(self) -> None:
        """Mark the slot just written as filled and move on to the next (oldest) slot."""
        self.filled.index_fill_(0, self.write_index, True)
        self.write_index.add_(1).remainder_(self.frames)
        self._advances[0] += 1

    def reset(self) -> None:
        """Forget all past frames (a scene cut, a new stream); keeps the buffers."""
        self.filled.zero_()
        self.write_index.zero_()
        self._advances[0] = 0


class TemporalBatch:
    """Several streams' caches as one, for a U-Net call whose batch stacks their rows.

    parts: (cache, rows) in batch order; a cache of None stands for rows with no bank
    (they attend to themselves only: their past slots are zeros, masked out). Every
    cache must keep the same number of frames, so that all rows have the same key count.
    The caller advances each stream's own cache after the call.
    """

    def __init__(self, parts: list[tuple[TemporalCache | None, int]]):
        frames = {c.frames for c, _ in parts if c is not None}
        if len(frames) != 1:
            raise ValueError(f"TemporalBatch needs caches with one frame count, got {sorted(frames) or 'none'}")
        self.frames = frames.pop()
        self.parts = parts

    def banks(self, layer: int, k: torch.Tensor) -> list[BankPart]:
        """As TemporalCache.banks, one part per cache: the rows of k (B, L, C) it covers, its
        bank buffers as stored, its filled flags. Each cache's ring sits in its own buffers,
        so the attention runs part by part rather than over a concatenation of them.
        Rows with no bank get a bank of 0 slots (a view of their own keys, never read)."""
        B, L, C = k.shape
        parts, start = [], 0
        for cache, n in self.parts:
            rows = slice(start, start + n)
            start += n
            if cache is None:
                none = k[rows, None, :, :][:, :0]  # (n, 0, L, C): nothing to attend to but themselves
                parts.append((rows, none, none, None))
            else:
                (_, bank_k, bank_v, filled), = cache.banks(layer, k[rows])
                parts.append((rows, bank_k, bank_v, filled))
        if start != B:
            raise ValueError(f"TemporalBatch covers {start} rows, the U-Net batch has {B}")
        return parts

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
        """As TemporalCache.attend, one kernel call per part (each cache's ring sits in its own buffers)."""
        pieces = [kernels.cached_attention(q[rows], k[rows], v[rows], bank_k, bank_v, filled, heads)
                  for rows, bank_k, bank_v, filled in self.banks(layer, k)]  # (b, L, C) each
        self.store(layer, k, v)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """As TemporalCache.store, part by part; rows with no bank store nothing."""
        start = 0
        for cache, n in self.parts:
            if cache is not None:
                cache.store(layer, k[start:start + n], v[start:start + n])
            start += n

    def fuse(self, layer: int, out: torch.Tensor) -> torch.Tensor:
        """As TemporalCache.fuse, part by part; rows with no bank are left as they are."""
        pieces, start = [], 0
        for cache, n in self.parts:
            piece = out[start:start + n]
            start += n
            pieces.append(piece if cache is None else cache.fuse(layer, piece))
        return torch.cat(pieces)


class TemporalRings:
    """One ring of past keys/values per batch row, all rows in one buffer per layer: the
    temporal cache of a whole bucket of streams (stream/step.py), read by one attention
    call per layer however many streams share it.

    Rows join and leave (streams open, close, reset) and are stepped or not (a stream
    with no frame this call, padding rows), so each row keeps its own ring position:

        keys[i], values[i]  (R, N, L_i, C_i)  as TemporalCache, one ring per row
        filled              (R, N) bool       which slots of each row's ring hold a frame
        write_index         (R,) int64        each row's slot for the current frame
        active              (R,) bool         the rows stepped by this call: only they store and advance

    `active` is written by the caller before each call (in place: a captured graph reads
    the same buffer). Its host copy (`advance(rows)`) counts each row's frames, so whether
    a read needs a mask is known on the host without a sync: `masked` is True while any
    row stepped by the call has an empty slot. The mask is then per row (rows of one
    call sit at different fill levels), built here for SDPA; once every stepped row is
    full the read is kernels.cached_attention unmasked, on the buffers as stored.

    A call's batch may hold `groups` copies of the R rows (full guidance: the negative
    prompt's rows after the positive ones); every copy reads the same rows' rings (a
    guidance row sees its frame's past, as the positive row does), only the first stores.
    """

    def __init__(self, shapes: list[tuple[int, int]], rows: int, frames: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32, fusion: float = 0.0):
        if frames < 1:
            raise ValueError(f"TemporalRings needs at least 1 frame, got {frames}")
        if not 0.0 <= fusion < 1.0:
            raise ValueError(f"TemporalRings fusion must be in [0, 1), got {fusion}")
        self.frames, self.fusion = frames, fusion
        self.keys = [torch.zeros(rows, frames, L, C, device=device, dtype=dtype) for L, C in shapes]
        self.values = [torch.zeros(rows, frames, L, C, device=device, dtype=dtype) for L, C in shapes]
        self.outputs = [torch.zeros(rows, frames, L, C, device=device, dtype=dtype)
                        if fusion and L <= FUSION_MAX_TOKENS else None for L, C in shapes]
        self.filled = torch.zeros(rows, frames, dtype=torch.bool, device=device)
        self.write_index = torch.zeros(rows, dtype=torch.long, device=device)
        self.active = torch.zeros(rows, dtype=torch.bool, device=device)
        self.counts = np.zeros(rows, dtype=np.int64)  # frames stored per row since its reset, on the host
        self.masked = True  # set by `prepare` for each call

    @property
    def rows(self) -> int:
        return self.filled.shape[0]

    def prepare(self, active: list[int]) -> None:
        """Before a call (host side): whether its read needs a mask, from the host counts of the rows it steps."""
        self.masked = bool(active) and int(self.counts[active].min()) < self.frames

    def _ring(self, bank: torch.Tensor, groups: int) -> torch.Tensor:
        # (R, ...) -> (groups * R, ...): a copy, made only when guidance rows read their frame's ring.
        return bank if groups == 1 else bank.repeat(groups, *(1,) * (bank.ndim - 1))

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
        """q, k, v (groups * R, L, C) over themselves and their rows' rings, then `store`. -> (groups * R, L, C)."""
        bank_k, bank_v = self.keys[layer], self.values[layer]
        R, N, L, C = bank_k.shape
        B = q.shape[0]
        if B % R or k.shape[1:] != (L, C):
            raise ValueError(f"TemporalRings layer {layer} holds (rows, tokens, channels) = {(R, L, C)}, "
                             f"got {tuple(k.shape)}: a batch of whole copies of the rows, of this latent size")
        groups = B // R
        read_k, read_v = self._ring(bank_k, groups), self._ring(bank_v, groups)
        if not self.masked:
            out = kernels.cached_attention(q, k, v, read_k, read_v, None, heads)
        else:
            # Rows at different fill levels: a mask per row, so the reference SDPA (the kernel's
            # flag is per ring). Only while a stepped row's ring is filling.
            valid = self._ring(self.filled, groups)[:, :, None].expand(B, N, L).reshape(B, N * L)
            mask = torch.cat([torch.ones(B, L, dtype=torch.bool, device=q.device), valid], dim=1)[:, None, None]
            k_all = torch.cat([k, read_k.reshape(B, N * L, C).to(k.dtype)], dim=1)  # (B, L + N*L, C)
            v_all = torch.cat([v, read_v.reshape(B, N * L, C).to(v.dtype)], dim=1)
            # (B, *, C) -> (B, heads, *, C / heads)
            qh, kh, vh = (t.view(B, -1, heads, C // heads).transpose(1, 2) for t in (q, k_all, v_all))
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)  # (B, heads, L, C / heads)
            out = out.transpose(1, 2).reshape(B, L, C)
        self._store(bank_k, k[:R])
        self._store(bank_v, v[:R])
        return out

    def _store(self, bank: torch.Tensor, x: torch.Tensor) -> None:
        """x (R, L, C) into each active row's slot `write_index`; other rows keep theirs (fixed shapes, no sync)."""
        rows = torch.arange(bank.shape[0], device=bank.device)
        old = bank[rows, self.write_index]  # (R, L, C)
        bank[rows, self.write_index] = torch.where(self.active[:, None, None], x.detach().to(bank.dtype), old)

    def fuse(self, layer: int, out: torch.Tensor) -> torch.Tensor:
        """As TemporalCache.fuse, row by row (each row against its own ring), for groups * R rows."""
        bank = self.outputs[layer]
        if bank is None:
            return out
        R, N, L, C = bank.shape
        B = out.shape[0]
        groups = B // R
        past = self._ring(bank, groups).view(B, N * L, C).to(out.dtype)
        sim = F.normalize(out, dim=-1) @ F.normalize(past, dim=-1).transpose(1, 2)  # (B, L, N*L)
        valid = self._ring(self.filled, groups)[:, None, :, None].expand(B, 1, N, L).reshape(B, 1, N * L)
        sim = sim.masked_fill(~valid, -2.0)  # never-written slots are never nearest
        best, index = sim.max(dim=-1)  # (B, L)
        nearest = past.gather(1, index[..., None].expand(B, L, C))  # (B, L, C)
        weight = self.fusion * (best > FUSION_THRESHOLD).to(out.dtype)[..., None]  # (B, L, 1)
        self._store(bank, out[:R])
        return out + weight * (nearest - out)

    def advance(self, rows: list[int] | None = None) -> None:
        """After a call: the active rows' slots are filled, their rings move on. `rows`: the
        same rows on the host (the counts), as written to `active`; None skips the count
        (a captured graph replays the device half only, the caller counts)."""
        n = torch.arange(self.frames, device=self.filled.device)
        self.filled |= self.active[:, None] & (n[None, :] == self.write_index[:, None])
        self.write_index.add_(self.active.long()).remainder_(self.frames)
        if rows is not None:
            self.count(rows)

    def count(self, rows: list[int]) -> None:
        self.counts[rows] += 1

    def reset(self, start: int, stop: int) -> None:
        """Forget rows [start, stop) (a stream that joins, resets or leaves); keeps the buffers."""
        self.filled[start:stop] = False
        self.write_index[start:stop] = 0
        self.counts[start:stop] = 0

    def view(self, start: int, stop: int) -> TemporalRings:
        """Rows [start, stop), sharing this one's buffers (writes land here): an eager call
        over the rows it steps, not the whole bucket."""
        view = TemporalRings.__new__(TemporalRings)
        view.frames, view.fusion, view.masked = self.frames, self.fusion, self.masked
        view.keys, view.values = [t[start:stop] for t in self.keys], [t[start:stop] for t in self.values]
        view.outputs = [t[start:stop] if t is not None else None for t in self.outputs]
        view.filled, view.write_index = self.filled[start:stop], self.write_index[start:stop]
        view.active, view.counts = self.active[start:stop], self.counts[start:stop]
        return view

    def moved(self, rows: int, keep: int) -> TemporalRings:
        """A copy with `rows` rows holding this one's first `keep` (a bucket that grows)."""
        new = TemporalRings.__new__(TemporalRings)
        new.frames, new.fusion, new.masked = self.frames, self.fusion, True

        def grown(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            out = torch.zeros((rows,) + t.shape[1:], dtype=t.dtype, device=t.device)
            out[:keep] = t[:keep]
            return out

        new.keys, new.values = [grown(t) for t in self.keys], [grown(t) for t in self.values]
        new.outputs = [grown(t) for t in self.outputs]
        new.filled, new.write_index, new.active = grown(self.filled), grown(self.write_index), grown(self.active)
        new.counts = np.zeros(rows, dtype=np.int64)
        new.counts[:keep] = self.counts[:keep]
        return new
