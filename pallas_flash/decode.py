"""Flash-Decoding: attention of a few new query tokens against a long KV cache (Pallas, Triton backend).

At decode time the query is 1..16 tokens, so one program per (batch row, K/V head) would leave most
of the GPU idle while it streams the whole cache. Flash-Decoding (Dao, Haziza, Massa, Sizov, 2023,
"Flash-Decoding for long-context inference"; also FlashDecoding++, Hong et al. 2023) splits the cache
length across ``num_splits`` programs as well ("split-K"):

1. ``pallas_flash_decode``: program ``(b, h, r, s)`` loads the query rows of every query head of K/V
   head ``h`` (grouped-query attention: ``G = N // K`` heads times ``T`` tokens = ``G*T`` rows, one
   tile, so each K/V block is read from HBM once for the whole group), streams the ``s``-th slice of
   the visible cache past them with an online softmax in float32 (base 2, ``scale * log2(e)`` folded
   into one multiply), and writes its normalised partial output and base-2 log-sum-exp;
2. a combine in plain jnp (the partials are tiny next to the cache): with ``L = max_s lse_s``,
   ``out = sum_s 2^(lse_s - L) o_s / sum_s 2^(lse_s - L)``, which is exact, not an approximation.

Semantics (decided here; ``reference`` has no decode mode). For batch row ``b`` the key/value at cache
position ``j`` is valid iff ``j < cache_lengths[b]``, and the ``T`` query tokens are the *last* ``T``
tokens of that valid cache: token ``t`` sits at position ``p = cache_lengths[b] - T + t`` and sees the
keys ``0 <= j <= p`` (causal among the new tokens, aligned at the *bottom right*). This is the natural
decode layout, and it differs from ``jax.nn.dot_product_attention(is_causal=True)``, which aligns at
the top left. With T=3 and cache_lengths[b]=5::

               j: 0 1 2 3 4
        t = 0     x x x . .
        t = 1     x x x x .
        t = 2     x x x x x

``local_window_size=(left, right)`` (or ``w`` for ``(w, w)``) further keeps ``j >= p - left``; ``right``
changes nothing since no token sees past itself. ``logits_soft_cap=c`` maps the scaled logits to
``c * tanh(logits / c)`` before masking (Gemma 2). A token that sees no key (``p < 0``, e.g. every
token of a row with ``cache_lengths[b] == 0``) returns zeros and a log-sum-exp of -inf, never NaN.
Lengths are clipped to ``[0, S_max]``.

The work of each row is split evenly over its *visible* blocks, computed at run time from its length
and window: a short row reads little, and a batch of rows of mixed lengths still keeps every
program busy. Results do not depend on timing (no atomics): the kernel is deterministic.

The cache is either contiguous, ``[B, S_max, K, H]``, or paged (vLLM's PagedAttention layout): page
pools ``[num_pages, page_size, K, H]`` and a ``[B, pages_per_row]`` page table; a key block then
gathers ``block_k / page_size`` whole pages.

Caution: forward only (inference; no gradient). Head dims up to 256; float16, bfloat16 and float32.
The split count (`default_num_splits`) and tile size (`default_block_k`) are heuristics of shape,
dtype and SM count, not a measured table: `benchmarks/decode.py --sweep` measures alternatives. A
paged cache needs power-of-two page sizes and head dims. In interpret mode (CPU) the kernel is
slow; use it for tests only.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_flash import masking
from pallas_flash.api import (KERNEL_DTYPES, MAX_HEAD_DIM, check_heads_and_dtypes, normalize_window,
                              validate_lengths)
from pallas_flash.config import is_power_of_two
from pallas_flash.forward import LOG2_E, dot_precision
from pallas_flash.tiles import load_tile, store_tile

MAX_QUERY_TOKENS = 16
# Rows (query heads x tokens) one program holds: a [rows, head_dim] float32 accumulator lives in
# registers, so larger groups (e.g. MQA with 32 heads and 16 tokens) are cut into row blocks.
MAX_BLOCK_ROWS = 64
# H100 SXM; used when the device does not report its SM count.
_DEFAULT_SM_COUNT = 132
# Shared memory the software pipeline may fill with K/V tiles: leaves room for Triton's own
# scratch (layout conversions, reductions) on Hopper (227 KiB per block) and on Ampere (163 KiB).
_PIPELINE_SMEM_BYTES = 128 * 1024


def _next_power_of_two(x: int, minimum: int = 16) -> int:
    return max(minimum, 1 << max(0, (x - 1).bit_length()))


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Tiling of the decode kernel; never changes a result beyond float rounding.

    ``block_k`` keys per loop step (power of two >= 16), None for `default_block_k`; ``num_splits``
    programs per (batch row, K/V head), None for `default_num_splits`; ``num_warps``/``num_stages``
    as in Triton.
    """

    block_k: int | None = None
    num_warps: int = 4
    num_stages: int = 2
    num_splits: int | None = None

    def __post_init__(self):
        for name in ("block_k", "num_warps", "num_stages"):
            value = getattr(self, name)
            if name == "block_k" and value is None:
                continue
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise ValueError(f"DecodeConfig.{name} must be an int, got {value!r}")
        if self.block_k is not None and (self.block_k < 16 or not is_power_of_two(self.block_k)):
            raise ValueError(f"DecodeConfig.block_k must be a power of two >= 16, got {self.block_k}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"DecodeConfig.num_warps must be one of 1, 2, 4, 8, 16, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"DecodeConfig.num_stages must be >= 1, got {self.num_stages}")
        if self.num_splits is not None and (
                not isinstance(self.num_splits, (int, np.integer)) or isinstance(self.num_splits, bool)
                or self.num_splits < 1):
            raise ValueError("DecodeConfig.num_splits must be a positive int or None, "
                             f"got {self.num_splits!r}")

    def replace(self, **changes) -> "DecodeConfig":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class DecodeStatics:
    """Everything static about one decode call (hashable: it keys the kernel's compilation)."""

    num_tokens: int  # T
    groups: int  # G = N // K
    block_rows: int  # rows of the query tile, a power of two >= 16
    kv_len: int  # S_max
    head_dim: int
    head_dim_padded: int
    scale: float
    soft_cap: float | None
    window_left: int | None
    block_k: int
    num_splits: int
    num_warps: int
    num_stages: int
    interpret: bool
    # Paged cache only: pages in the pool, keys per page, pages per block_k.
    num_pages: int | None = None
    page_size: int | None = None

    @property
    def pages_per_block(self) -> int:
        return self.block_k // self.page_size

    @property
    def rows(self) -> int:
        """Real query rows per K/V head: G heads times T tokens."""
        return self.groups * self.num_tokens


def sm_count() -> int:
    """Streaming multiprocessors of the first device (132 on an H100 SXM when not reported)."""
    try:
        count = getattr(jax.devices()[0], "core_count", None)
    except RuntimeError:
        count = None
    return int(count) if isinstance(count, (int, np.integer)) and count > 0 else _DEFAULT_SM_COUNT


def default_block_k(head_dim: int, itemsize: int, num_stages: int, kv_len: int) -> int:
    """Keys per loop step: up to 128, but the K and V tiles of every pipeline stage must fit in
    ``_PIPELINE_SMEM_BYTES`` of shared memory (about half an H100 SM's), and no tile may be larger
    than the padded cache."""
    padded = _next_power_of_two(head_dim)
    block_k = 128
    while block_k > 16 and 2 * block_k * padded * itemsize * num_stages > _PIPELINE_SMEM_BYTES:
        block_k //= 2
    return max(16, min(block_k, _next_power_of_two(kv_len)))


def default_num_splits(batch: int, kv_heads: int, kv_len: int, *, block_k: int, row_blocks: int = 1,
                       num_sms: int | None = None, waves: int = 4, min_blocks_per_split: int = 4) -> int:
    """Splits per (batch row, K/V head): about ``waves`` programs per SM (the default tiling's
    128 KiB of pipeline buffers leave room for one resident program per H100 SM, so several waves
    keep the tail short), but every split keeps at least ``min_blocks_per_split`` blocks of
    ``block_k`` keys so that the per-split prologue, the partial write and the combine stay small
    next to the cache it streams."""
    num_sms = sm_count() if num_sms is None else num_sms
    programs = batch * kv_heads * row_blocks
    wanted = max(1, round(waves * num_sms / programs))
    most = max(1, pl.cdiv(pl.cdiv(kv_len, block_k), min_blocks_per_split))
    return int(min(wanted, most))


def _block_rows(rows: int) -> int:
    return min(_next_power_of_two(rows), MAX_BLOCK_ROWS)


def resolve_config(config: DecodeConfig | None, *, batch: int, num_tokens: int, num_heads: int,
                   kv_heads: int, head_dim: int, kv_len: int, itemsize: int) -> DecodeConfig:
    """The `DecodeConfig` a call of this shape runs with: ``block_k`` and ``num_splits`` filled in
    (`default_block_k`, `default_num_splits`) where None, ``block_k`` cut to the padded cache."""
    config = DecodeConfig() if config is None else config
    if config.block_k is None:
        block_k = default_block_k(head_dim, itemsize, config.num_stages, kv_len)
    else:
        block_k = max(16, min(config.block_k, _next_power_of_two(kv_len)))
    splits = config.num_splits
    if splits is None:
        rows = (num_heads // kv_heads) * num_tokens
        splits = default_num_splits(batch, kv_heads, kv_len, block_k=block_k,
                                    row_blocks=pl.cdiv(rows, _block_rows(rows)))
    return config.replace(block_k=int(block_k), num_splits=int(splits))


def _split_block_range(statics: DecodeStatics, length, split):
    """Key blocks of this program as ``(lo, full_lo, full_hi, hi)`` for `masking.run_blocks`.

    Blocks in ``[lo, hi)`` may hold a visible key; those in ``[full_lo, full_hi)`` hold only keys
    that every token of the tile sees, so they skip the element-wise mask.
    """
    T, block_k = statics.num_tokens, statics.block_k
    first = jnp.int32(0)  # first key any token sees
    full_first = jnp.int32(0)  # first key every token sees
    if statics.window_left is not None:
        first = jnp.maximum(length - T - statics.window_left, 0)
        full_first = jnp.maximum(length - 1 - statics.window_left, 0)
    full_last = jnp.maximum(length - T + 1, 0)  # keys below it are seen by every token
    row_lo = lax.div(first, block_k)
    row_hi = jnp.maximum(masking.cdiv(length, block_k), row_lo)
    per_split = masking.cdiv(row_hi - row_lo, statics.num_splits)
    lo = jnp.minimum(row_lo + split * per_split, row_hi)
    hi = jnp.minimum(lo + per_split, row_hi)
    full_lo = jnp.clip(masking.cdiv(full_first, block_k), lo, hi)
    full_hi = jnp.clip(lax.div(full_last, block_k), full_lo, hi)
    return lo, full_lo, full_hi, hi


def _load_kv(ref, table_ref, kb, length, *, masked: bool, statics: DecodeStatics):
    """The ``[block_k, H_pad]`` K or V tile of key block ``kb``; in masked blocks, keys at or past
    ``length`` read as zeros (past the length the cache may hold anything, NaN included)."""
    block_k = statics.block_k
    k_start = kb * block_k
    if table_ref is None:
        keys = pl.ds(pl.multiple_of(k_start, block_k), block_k)
        # Masked blocks may reach past the length, hence past S_max: their loads need the bound.
        return load_tile(ref.at[keys, :], first_row=k_start, valid_rows=length if masked else None,
                         valid_cols=statics.head_dim)
    per_block = statics.pages_per_block
    pages = table_ref[pl.ds(pl.multiple_of(kb * per_block, per_block), per_block)]
    # Entries past a row's last page may be stale or unset: clamped, they still address the pool.
    pages = jnp.clip(pages, 0, statics.num_pages - 1)
    tile = ref[pages].reshape(block_k, statics.head_dim_padded)
    if masked:
        valid = k_start + jnp.arange(block_k, dtype=jnp.int32) < length
        tile = jnp.where(valid[:, None], tile, jnp.zeros_like(tile))
    return tile


def _decode_kernel(q_ref, k_ref, v_ref, lengths_ref, table_ref, o_ref, lse_ref, *, statics: DecodeStatics):
    block_k, block_rows, head_dim = statics.block_k, statics.block_rows, statics.head_dim
    T = statics.num_tokens
    precision = dot_precision(q_ref.dtype)
    row_start = pl.program_id(2) * block_rows
    split = pl.program_id(3)
    length = jnp.clip(lengths_ref[...], 0, statics.kv_len)

    # The wrapper already padded the query rows and head dim with zeros: no mask needed.
    q = q_ref[...]
    # Rows are ordered (token, head): row r is token r // G. Padding rows copy the last token, so the
    # causal test alone keeps every row inside [0, length).
    rows = row_start + jnp.arange(block_rows, dtype=jnp.int32)
    token = jnp.minimum(lax.div(rows, statics.groups), T - 1)
    q_pos = (length - T + token)[:, None]

    def logits(s):
        if statics.soft_cap is None:
            return s * (statics.scale * LOG2_E)
        cap = statics.soft_cap
        return jnp.tanh(s * (statics.scale / cap)) * (cap * LOG2_E)

    def body(kb, carry, *, masked):
        acc, m_prev, l_prev = carry
        k_start = kb * block_k
        load = functools.partial(_load_kv, table_ref=table_ref, kb=kb, length=length, masked=masked,
                                 statics=statics)
        k = load(k_ref)
        s = logits(plgpu.dot(q, k, trans_b=True, precision=precision))  # [rows, block_k], base 2
        if masked:
            k_pos = (k_start + jnp.arange(block_k, dtype=jnp.int32))[None, :]
            visible = k_pos <= q_pos
            if statics.window_left is not None:
                visible &= k_pos >= q_pos - statics.window_left
            s = jnp.where(visible, s, masking.MASK_VALUE)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
        alpha = jnp.exp2(m_prev - m_next)
        p = jnp.exp2(s - m_next[:, None])
        l_next = l_prev * alpha + jnp.sum(p, axis=1)
        v = load(v_ref)
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v, precision=precision)
        return acc, m_next, l_next

    carry = (jnp.zeros((block_rows, statics.head_dim_padded), jnp.float32),
             jnp.full((block_rows,), -jnp.inf, jnp.float32),
             jnp.zeros((block_rows,), jnp.float32))
    acc, m, l = masking.run_blocks(body, carry, _split_block_range(statics, length, split))

    # m stayed -inf (empty split) or MASK_VALUE (only masked logits): no key seen by this split.
    empty = m <= 0.5 * masking.MASK_VALUE
    l_safe = jnp.where(empty, 1.0, l)
    inv_l = jnp.where(empty, 0.0, 1.0 / l_safe)
    tail = statics.rows if statics.rows % block_rows else None
    store_tile(o_ref, acc * inv_l[:, None], first_row=row_start, valid_rows=tail, valid_cols=head_dim)
    store_tile(lse_ref, jnp.where(empty, -jnp.inf, m + jnp.log2(l_safe)), first_row=row_start,
               valid_rows=tail)


def _decode_partials(q_rows, key_cache, value_cache, lengths, page_table, *, statics: DecodeStatics):
    """``q_rows`` ``[B, K, R_pad, H_pad]`` -> partial outputs ``[B, K, splits, G*T, H]`` float32 and
    base-2 log-sum-exps ``[B, K, splits, G*T]``. ``page_table`` (None: contiguous caches) is
    ``[B, pages]``, padded to whole blocks."""
    B, K = q_rows.shape[:2]
    S, H = statics.kv_len, statics.head_dim
    block_k, block_rows, padded = statics.block_k, statics.block_rows, statics.head_dim_padded
    row_blocks = q_rows.shape[2] // block_rows
    kv_rows = pl.cdiv(S, block_k) * block_k
    splits = statics.num_splits
    # The cache block is the whole (padded) sequence of one K/V head, or the whole page pool of
    # one K/V head; the kernel slices (or gathers) its blocks itself.
    if page_table is None:
        kv_spec = pl.BlockSpec((None, kv_rows, None, padded), lambda b, h, r, s: (b, 0, h, 0))
        table_spec = None
    else:
        kv_spec = pl.BlockSpec((statics.num_pages, statics.page_size, None, padded),
                               lambda b, h, r, s: (0, 0, h, 0))
        table_spec = pl.BlockSpec((None, page_table.shape[1]), lambda b, h, r, s: (b, 0))
    return pl.pallas_call(
        functools.partial(_decode_kernel, statics=statics),
        grid=(B, K, row_blocks, splits),
        in_specs=[
            pl.BlockSpec((None, None, block_rows, padded), lambda b, h, r, s: (b, h, r, 0)),
            kv_spec,
            kv_spec,
            pl.BlockSpec((None,), lambda b, h, r, s: (b,)),
            table_spec,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, block_rows, padded), lambda b, h, r, s: (b, h, s, r, 0)),
            pl.BlockSpec((None, None, None, block_rows), lambda b, h, r, s: (b, h, s, r)),
        ],
        out_shape=[jax.ShapeDtypeStruct((B, K, splits, statics.rows, H), jnp.float32),
                   jax.ShapeDtypeStruct((B, K, splits, statics.rows), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=statics.num_warps, num_stages=statics.num_stages),
        interpret=statics.interpret,
        name="pallas_flash_decode",
    )(q_rows, key_cache, value_cache, lengths, page_table)


def combine_splits(out_parts, lse2_parts):
    """Exact merge of per-split softmax results along axis 2.

    ``out_parts`` ``[B, K, splits, rows, H]`` are each normalised by their own sum and ``lse2_parts``
    ``[B, K, splits, rows]`` are their base-2 log-sum-exps (-inf: the split saw nothing). Returns the
    merged output and base-2 log-sum-exp; rows no split saw give zeros and -inf.
    """
    top = jnp.max(lse2_parts, axis=2, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    weights = jnp.exp2(lse2_parts - top)  # exactly 0 for empty splits
    total = jnp.sum(weights, axis=2)
    seen = total > 0
    inv = jnp.where(seen, 1.0 / jnp.where(seen, total, 1.0), 0.0)
    out = jnp.sum(weights[..., None] * out_parts, axis=2) * inv[..., None]
    lse2 = jnp.where(seen, top[:, :, 0] + jnp.log2(jnp.where(seen, total, 1.0)), -jnp.inf)
    return out, lse2


@functools.partial(jax.jit, static_argnames=("statics",))
def _decode(query, key_cache, value_cache, lengths, page_table, *, statics: DecodeStatics):
    B, T, N, H = query.shape
    K = key_cache.shape[2]
    G = statics.groups
    # [B, T, K, G, H] -> [B, K, T*G, H]: the tile of one K/V head holds all of its query heads.
    q_rows = jnp.transpose(query.reshape(B, T, K, G, H), (0, 2, 1, 3, 4)).reshape(B, K, T * G, H)
    row_pad = pl.cdiv(T * G, statics.block_rows) * statics.block_rows - T * G
    q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, row_pad), (0, statics.head_dim_padded - H)))
    if page_table is not None:
        per_block = statics.pages_per_block
        pages = page_table.shape[1]
        page_table = jnp.pad(page_table, ((0, 0), (0, pl.cdiv(pages, per_block) * per_block - pages)))
    out_parts, lse2_parts = _decode_partials(q_rows, key_cache, value_cache, lengths, page_table,
                                             statics=statics)
    if statics.num_splits == 1:
        out, lse2 = out_parts[:, :, 0], lse2_parts[:, :, 0]
    else:
        out, lse2 = combine_splits(out_parts, lse2_parts)
    out = jnp.transpose(out.reshape(B, K, T, G, H), (0, 2, 1, 3, 4)).reshape(B, T, N, H)
    lse = jnp.transpose(lse2.reshape(B, K, T, G), (0, 2, 1, 3)).reshape(B, T, N) * math.log(2.0)
    return out.astype(query.dtype), lse


def _static_positive(x, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a static Python number (the kernel bakes it in), got {x!r}")
    if not (math.isfinite(x) and x > 0):
        raise ValueError(f"{name} must be finite and > 0, got {x!r}")
    return float(x)


def decode_attention(query, key_cache, value_cache, *, cache_lengths, scale: float | None = None,
                     local_window_size: int | tuple[int, int] | None = None,
                     logits_soft_cap: float | None = None, return_residual: bool = False,
                     page_table=None, num_splits: int | None = None,
                     config: DecodeConfig | None = None, interpret: bool | None = None):
    """Attention of ``T <= 16`` new tokens per row against a KV cache, split-K (Flash-Decoding).

    Args:
      query: ``[B, T, N, H]``, the last ``T`` tokens of each row's valid cache (see the module
        docstring for the exact, bottom-right aligned causal semantics).
      key_cache, value_cache: ``[B, S_max, K, H]`` with ``N % K == 0`` (MHA, GQA or MQA), the query's
        dtype (float16, bfloat16 or float32); with ``page_table``, page pools
        ``[num_pages, page_size, K, H]`` instead.
      cache_lengths: ``(B,)`` integers, the valid keys of each row (traced: no recompilation when
        they change); clipped to ``[0, S_max]``.
      scale: logit scale, ``1/sqrt(H)`` when None.
      local_window_size: ``w`` or ``(left, right)``: token at position ``p`` sees ``j >= p - left``.
      logits_soft_cap: ``c``: logits become ``c * tanh(logits / c)`` after scaling, before masking.
      return_residual: also return the natural-log log-sum-exp ``[B, T, N]`` float32 (-inf on
        tokens that see no key).
      page_table: None (contiguous caches) or ``[B, pages_per_row]`` integers (paged cache, as in
        vLLM's PagedAttention): position ``j`` of row ``b`` is slot ``j % page_size`` of page
        ``page_table[b, j // page_size]``; ``S_max = pages_per_row * page_size``. Entries past a row's
        last page are never used for a result (they are clamped into the pool, so any value is safe).
        ``page_size`` and ``H`` must be powers of two (16 <= H); a ``block_k`` spans whole pages.
      num_splits: programs per (row, K/V head) along the cache; overrides ``config.num_splits``.
      config: `DecodeConfig` (block size, warps, stages); the defaults when None.
      interpret: run the kernel in Pallas interpret mode; default: whenever the backend is not a GPU.

    Returns:
      ``[B, T, N, H]`` in the query dtype (and the log-sum-exp when ``return_residual``).

    Raises:
      ValueError: wrong ranks, shapes, dtypes, lengths, window, scale, soft cap or split count.
      NotImplementedError: a head dim above 256 or a dtype the kernel does not take.
    """
    query, key_cache, value_cache = jnp.asarray(query), jnp.asarray(key_cache), jnp.asarray(value_cache)
    if query.ndim != 4 or key_cache.ndim != 4 or value_cache.ndim != 4:
        raise ValueError("query must be [B, T, N, H] and key_cache/value_cache [B, S_max, K, H], got "
                         f"query.shape={query.shape} key_cache.shape={key_cache.shape} "
                         f"value_cache.shape={value_cache.shape}")
    B, T, N, H = query.shape
    _, S, K, _ = key_cache.shape
    paged = page_table is not None
    if paged:
        page_table = jnp.asarray(page_table)
        num_pages, page_size = key_cache.shape[:2]
        if (page_table.ndim != 2 or page_table.shape[0] != B
                or not jnp.issubdtype(page_table.dtype, jnp.integer)):
            raise ValueError(f"page_table must be an integer array [B, pages_per_row] with B={B}, got "
                             f"page_table.shape={page_table.shape} dtype={page_table.dtype}")
        if key_cache.shape != value_cache.shape or key_cache.shape[3] != H:
            raise ValueError("with a page_table, key_cache and value_cache must be page pools "
                             "[num_pages, page_size, K, H] with the query's head dim, got "
                             f"query.shape={query.shape} key_cache.shape={key_cache.shape} "
                             f"value_cache.shape={value_cache.shape}")
        if not is_power_of_two(page_size):
            raise NotImplementedError(f"page_size must be a power of two, got {page_size} "
                                      f"(key_cache.shape={key_cache.shape})")
        if H < 16 or not is_power_of_two(H):
            raise NotImplementedError(f"a paged cache needs a power-of-two head dim >= 16, got {H}")
        S = page_table.shape[1] * page_size
    elif key_cache.shape != value_cache.shape or key_cache.shape[0] != B or key_cache.shape[3] != H:
        raise ValueError("key_cache and value_cache must be [B, S_max, K, H] with the query's batch size "
                         f"and head dim, got query.shape={query.shape} key_cache.shape={key_cache.shape} "
                         f"value_cache.shape={value_cache.shape}")
    if not 1 <= T <= MAX_QUERY_TOKENS:
        raise ValueError(f"decode_attention takes 1 to {MAX_QUERY_TOKENS} query tokens, got T={T} "
                         f"(query.shape={query.shape}); use dot_product_attention for prefill")
    if S < 1 or K < 1 or N < 1 or H < 1:
        raise ValueError(f"empty dimension: query.shape={query.shape} key_cache.shape={key_cache.shape}")
    check_heads_and_dtypes(query=query, key_cache=key_cache, value_cache=value_cache)
    if cache_lengths is None:
        raise ValueError(f"cache_lengths must be an int32 array of shape (B,) = ({B},), got None")
    lengths = validate_lengths(cache_lengths, B, "cache_lengths")
    window = normalize_window(local_window_size)
    window_left = None if window is None else window[0]  # the right side never reaches past the cache end
    scale = 1.0 / math.sqrt(H) if scale is None else scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)):
        raise ValueError(f"scale must be a static Python number, got {type(scale).__name__}")
    soft_cap = None if logits_soft_cap is None else _static_positive(logits_soft_cap, "logits_soft_cap")
    config = DecodeConfig() if config is None else config
    if not isinstance(config, DecodeConfig):
        raise ValueError(f"config must be a DecodeConfig, got {type(config).__name__}")
    if num_splits is not None:
        config = config.replace(num_splits=num_splits)  # validated by DecodeConfig
    if query.dtype not in KERNEL_DTYPES:
        raise NotImplementedError("decode_attention supports float16, bfloat16 and float32, "
                                  f"got {query.dtype}")
    if H > MAX_HEAD_DIM:
        raise NotImplementedError(f"decode_attention supports head dims up to {MAX_HEAD_DIM}, got {H}")

    groups = N // K
    block_rows = _block_rows(groups * T)
    paging = {}
    if paged:
        # A block covers whole pages, and at least 16 keys (the dot's minimum); fixed before the
        # split count is derived from it.
        block_k = config.block_k or default_block_k(H, query.dtype.itemsize, config.num_stages, S)
        config = config.replace(block_k=max(block_k, page_size, 16))
        paging = dict(num_pages=num_pages, page_size=page_size)
        page_table = page_table.astype(jnp.int32)
    config = resolve_config(config, batch=B, num_tokens=T, num_heads=N, kv_heads=K, head_dim=H,
                            kv_len=S, itemsize=query.dtype.itemsize)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    statics = DecodeStatics(
        num_tokens=T, groups=groups, block_rows=block_rows, kv_len=S, head_dim=H,
        head_dim_padded=_next_power_of_two(H), scale=float(scale), soft_cap=soft_cap,
        window_left=window_left, block_k=config.block_k, num_splits=config.num_splits,
        num_warps=config.num_warps, num_stages=config.num_stages, interpret=bool(interpret), **paging)
    out, lse = _decode(query, key_cache, value_cache, lengths, page_table,
                       statics=statics)
    return (out, lse) if return_residual else out
