"""Self-attention over the current frame and a TemporalCache ring, read in place; reference:
reference.cached_attention.

Flash-attention's forward (Dao et al. 2022; the online softmax of Milakov & Gimelshein
2018): each program holds BLOCK_M queries of one (batch, head) and walks the keys in
blocks of BLOCK_N, keeping the running max, the running sum and the weighted values in
fp32, so the (L, L + N*L) score matrix never exists. The keys are the current frame's,
then each ring slot's, read where the cache keeps them: no concatenation copies the
bank per layer per step, and an empty slot (filled[n], or filled[b, n] with one set of
flags per row) is skipped outright instead of being loaded and masked.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from livestyle.kernels.tuning import autotune, config

# Query and key blocks, warps and pipeline stages; the best choice follows the tokens per
# frame (L: 4096 at SD-Turbo's top level, 64 at its bottom) and the head width (BLOCK_D).
# The first (the choice in the interpreter) is the flash-attention tutorial's default.
_CONFIGS = [config(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
            config(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
            config(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=3),
            config(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3),
            config(BLOCK_M=32, BLOCK_N=32, num_warps=2, num_stages=2)]


@triton.jit
def _attend(q, acc, m_i, l_i, k_ptr, v_ptr, k_stride, v_stride, L, D, qk_scale,
            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    """Fold L keys/values at k_ptr, v_ptr (row strides k_stride, v_stride) into the running (acc, max, sum)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for start in range(0, L, BLOCK_N):
        n = start + offs_n
        kv_mask = (n[:, None] < L) & (offs_d[None, :] < D)
        k = tl.load(k_ptr + n[:, None] * k_stride + offs_d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
        v = tl.load(v_ptr + n[:, None] * v_stride + offs_d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
        if IEEE:  # fp32 inputs: full fp32 products, as torch's reference (not TF32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale  # (BLOCK_M, BLOCK_N), in log2 units
        s = tl.where(n[None, :] < L, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)  # rescales what was summed under the old max
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v)  # p rounded to q's dtype, as flash attention
        m_i = m_new
    return acc, m_i, l_i


@autotune(_CONFIGS, key=["L", "BLOCK_D"])
@triton.jit
def _cached_attention_kernel(q_ptr, k_ptr, v_ptr, bk_ptr, bv_ptr, filled_ptr, o_ptr,
                             sq_b, sq_l, sk_b, sk_l, sv_b, sv_l, sbk_b, sbk_n, sbk_l, sbv_b, sbv_n, sbv_l,
                             so_b, so_l, sf_b, H, L, D, N, qk_scale,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                             IEEE: tl.constexpr):
    """Program (query block, b * H + h): out[b, block, h] over the current keys, then each filled slot's."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_m[:, None] < L) & (offs_d[None, :] < D)
    q = tl.load(q_ptr + b * sq_b + offs_m[:, None] * sq_l + h * D + offs_d[None, :], mask=q_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, m_i, l_i = _attend(q, acc, m_i, l_i, k_ptr + b * sk_b + h * D, v_ptr + b * sv_b + h * D, sk_l, sv_l,
                            L, D, qk_scale, BLOCK_N, BLOCK_D, IEEE)
    for n in range(0, N):
        if tl.load(filled_ptr + b * sf_b + n) != 0:  # an empty slot costs one load, no keys read
            acc, m_i, l_i = _attend(q, acc, m_i, l_i, bk_ptr + b * sbk_b + n * sbk_n + h * D,
                                    bv_ptr + b * sbv_b + n * sbv_n + h * D, sbk_l, sbv_l,
                                    L, D, qk_scale, BLOCK_N, BLOCK_D, IEEE)
    out = acc / l_i[:, None]  # the current frame's keys make every row's sum positive
    tl.store(o_ptr + b * so_b + offs_m[:, None] * so_l + h * D + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=q_mask)


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bank_k: torch.Tensor, bank_v: torch.Tensor,
                     filled: torch.Tensor | None, heads: int) -> torch.Tensor:
    """Same contract as reference.cached_attention; the bank is read where it lies (any batch stride)."""
    B, L, C = q.shape
    N = bank_k.shape[1]
    if C % heads:
        raise ValueError(f"cached_attention: {heads} heads do not divide {C} channels")
    if k.shape != q.shape or v.shape != q.shape or bank_k.shape != (B, N, L, C) or bank_v.shape != bank_k.shape:
        raise ValueError(f"cached_attention: q, k, v (B, L, C) = {tuple(q.shape)} need a bank (B, N, L, C), "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}, bank {tuple(bank_k.shape)}")
    # The head's channels must be adjacent (stride 1) and the banks' (l, c) a dense block per slot.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    bank_k, bank_v = (t if t.stride(-1) == 1 and t.stride(-2) == C else t.contiguous() for t in (bank_k, bank_v))
    if filled is not None and filled.shape not in ((N,), (B, N)):
        raise ValueError(f"cached_attention: filled must be (N,) or (B, N) = ({N},) or ({B}, {N}), "
                         f"got {tuple(filled.shape)}")
    if filled is None or N == 0:  # every slot filled; at least one element, so the pointer is a real one
        filled = torch.ones(max(N, 1), dtype=torch.bool, device=q.device)
    filled = filled.contiguous()
    row_stride = filled.stride(0) if filled.ndim == 2 else 0  # (N,): every row reads the same flags
    D = C // heads
    out = torch.empty((B, L, C), device=q.device, dtype=q.dtype)
    block_d = max(16, triton.next_power_of_2(D))  # tl.dot needs 16 at least
    qk_scale = 1.0 / math.sqrt(D) * math.log2(math.e)  # exp2 of log2-scaled scores: the softmax, cheaper
    grid = lambda meta: (triton.cdiv(L, meta["BLOCK_M"]), B * heads)  # noqa: E731
    _cached_attention_kernel[grid](
        q, k, v, bank_k, bank_v, filled, out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        bank_k.stride(0), bank_k.stride(1), bank_k.stride(2), bank_v.stride(0), bank_v.stride(1), bank_v.stride(2),
        out.stride(0), out.stride(1), row_stride, heads, L, D, N, qk_scale,
        BLOCK_D=block_d, IEEE=q.dtype == torch.float32)
    return out
