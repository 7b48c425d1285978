"""Which logits survive: the one place that decides, for the forward, dK/dV and dQ kernels alike.

Query row ``i`` (0 <= i < T) may attend key column ``j`` (0 <= j < S) iff all of these hold:

* ``i < query_seq_lengths[b]`` and ``j < key_value_seq_lengths[b]`` (when given);
* ``j <= i`` when causal;
* ``i - left <= j <= i + right`` for ``local_window_size=(left, right)``;
* ``query_segment_ids[b, i] == key_value_segment_ids[b, j]`` (when given: packed sequences).

Positions are aligned at the *top left*, exactly as ``jax.nn.dot_product_attention`` builds its mask
(``tril(ones((T, S)))``): row ``i`` sees keys ``0..i`` whatever ``S`` is. With T=3, S=5, causal::

           j: 0 1 2 3 4
    i = 0     x . . . .
    i = 1     x x . . .
    i = 2     x x x . .

(FlashAttention's own kernels align causal masks at the bottom right instead; we follow jax.nn.)
A row that sees no key at all returns zeros and a log-sum-exp of -inf, never NaN.

Two levels of work are saved (FlashAttention-2 paper, section 3.1.1 "causal masking"): blocks wholly
outside the band are never visited, and blocks wholly inside it skip the element-wise mask.

Segment ids add a data-dependent part to both levels (`segment_block_ranges`): per pair of blocks the
wrapper compares the [min, max] segment ids of the query block and of the key block, O(B * blocks^2)
work and memory, never O(T * S). A key block whose range misses the query block's holds no visible
logit; a pair in which both blocks hold one and the same id needs no segment mask. The loops visit one
contiguous range of blocks, which is tight when the ids are non-decreasing along each row (packed
sequences); for arbitrary ids it is merely wider, and the element-wise mask keeps results exact.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
from jax import lax

# Logits of masked positions. Finite, so that a row whose every logit so far is masked keeps a
# finite running max and exp2(x - max) stays NaN-free; low enough that exp2 of it is exactly 0.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """The static part of the mask: shapes and flags; the per-row lengths arrive as arrays."""

    q_len: int
    kv_len: int
    is_causal: bool = False
    window: tuple[int, int] | None = None
    has_q_lengths: bool = False
    has_kv_lengths: bool = False
    has_segment_ids: bool = False
    # A boolean mask array: data-dependent anywhere, so no tile may skip the element-wise mask.
    has_mask: bool = False
    # Not a visibility rule but part of *what* is computed, so it lives here with the rest of it:
    # logits -> soft_cap * tanh(logits / soft_cap) after scaling, before bias and masking.
    soft_cap: float | None = None

    def needs_kv_bound(self, block_k: int) -> bool:
        """Whether a key tile can reach past the last valid key."""
        return self.has_kv_lengths or self.kv_len % block_k != 0


def cdiv(x, d: int):
    """Ceil division of a non-negative traced int by a static int."""
    return lax.div(x + (d - 1), d)


def _clip(x, lo, hi):
    return jnp.minimum(jnp.maximum(x, lo), hi)


def tile_mask(spec: MaskSpec, q_pos, k_pos, kv_end, *, check_kv_end: bool, q_seg=None, k_seg=None,
              mask_tile=None):
    """Boolean visibility of a tile, or None when every position of any tile is visible.

    ``q_pos`` is ``(bq, 1)`` and ``k_pos`` is ``(1, bk)`` (absolute positions; the dK/dV kernel passes
    them transposed); ``kv_end`` is the number of valid keys of this batch row. ``q_seg``/``k_seg``
    are the segment ids of the tile's rows/columns, shaped like ``q_pos``/``k_pos``, when
    ``spec.has_segment_ids``; ``mask_tile`` is the tile of a user mask array (nonzero: visible),
    broadcastable to the tile, when ``spec.has_mask``.
    """
    conditions = []
    if mask_tile is not None:
        conditions.append(mask_tile != 0)
    if spec.has_segment_ids:
        conditions.append(q_seg == k_seg)
    if check_kv_end:
        conditions.append(k_pos < kv_end)
    if spec.is_causal:
        conditions.append(k_pos <= q_pos)
    if spec.window is not None:
        left, right = spec.window
        conditions.append(k_pos >= q_pos - left)
        conditions.append(k_pos <= q_pos + right)
    if not conditions:
        return None
    return functools.reduce(jnp.logical_and, conditions)


def _pick(vector, index: int):
    """Element ``index`` of a small loaded vector: Triton tensors have no scalar indexing."""
    return jnp.sum(jnp.where(jnp.arange(vector.shape[0]) == index, vector, 0))


def _with_segments(spec: MaskSpec, block_range, segment_range):
    """Intersects a positional block range with a `segment_block_ranges` row (a loaded 4-vector),
    and drops the mask-free run when a mask array is given."""
    lo, full_lo, full_hi, hi = block_range
    if spec.has_mask:
        full_lo = full_hi = lo
    if segment_range is None:
        return lo, full_lo, full_hi, hi
    s_lo, s_full_lo, s_full_hi, s_hi = (_pick(segment_range, c) for c in range(4))
    lo = jnp.maximum(lo, s_lo)
    hi = jnp.maximum(jnp.minimum(hi, s_hi), lo)
    full_lo = _clip(jnp.maximum(full_lo, s_full_lo), lo, hi)
    full_hi = _clip(jnp.minimum(full_hi, s_full_hi), full_lo, hi)
    return lo, full_lo, full_hi, hi


def kv_block_range(spec: MaskSpec, q_start, q_end, kv_end, block_q: int, block_k: int,
                   segment_range=None):
    """Key blocks a query block must visit, as ``(lo, full_lo, full_hi, hi)``.

    Blocks in ``[lo, hi)`` hold at least one visible logit; those in ``[full_lo, full_hi)`` hold only
    visible logits and skip the element-wise mask. ``q_end`` is the number of valid query rows.
    ``segment_range`` is this query block's row of `segment_block_ranges` when segment ids are given.
    """
    q_stop = jnp.minimum(q_start + block_q, q_end)
    first, last = 0, kv_end  # visible key columns of the block's rows: [first, last)
    full_first, full_last = 0, kv_end  # columns visible to *every* row of the block
    if spec.is_causal:
        last = jnp.minimum(last, q_stop)
        full_last = jnp.minimum(full_last, q_start + 1)
    if spec.window is not None:
        left, right = spec.window
        first = jnp.maximum(q_start - left, 0)
        last = jnp.minimum(last, q_stop + right)
        full_first = jnp.maximum(q_stop - 1 - left, 0)
        full_last = jnp.minimum(full_last, q_start + right + 1)
    lo = lax.div(jnp.asarray(first, jnp.int32), block_k)
    hi = jnp.maximum(cdiv(jnp.maximum(last, 0), block_k), lo)
    if spec.has_q_lengths:
        hi = jnp.where(q_start < q_end, hi, lo)
    full_lo = _clip(cdiv(jnp.asarray(full_first, jnp.int32), block_k), lo, hi)
    full_hi = _clip(lax.div(jnp.maximum(full_last, 0), block_k), full_lo, hi)
    return _with_segments(spec, (lo, full_lo, full_hi, hi), segment_range)


def q_block_range(spec: MaskSpec, k_start, q_end, kv_end, block_q: int, block_k: int,
                  segment_range=None):
    """Query blocks a key block must visit (the dK/dV kernel's loop), as ``(lo, full_lo, full_hi, hi)``.

    Rows past ``q_end`` need no mask: the backward reads their log-sum-exp as +inf, so their
    probabilities are exactly zero.
    """
    k_stop = jnp.minimum(k_start + block_k, kv_end)
    first, last = 0, q_end  # query rows that see at least one key of the block
    full_first = 0  # rows from which on every key of the block is visible ...
    full_hi = None  # ... up to this query block (exclusive); None: to the end
    if spec.is_causal:
        first = jnp.maximum(first, k_start)
        full_first = jnp.maximum(full_first, k_start + block_k - 1)
    if spec.window is not None:
        left, right = spec.window
        first = jnp.maximum(first, k_start - right)
        last = jnp.minimum(last, k_stop + left)
        full_first = jnp.maximum(full_first, k_start + block_k - 1 - right)
        full_hi = lax.div(k_start + left + 1, block_q)
    lo = lax.div(jnp.asarray(first, jnp.int32), block_q)
    hi = jnp.maximum(cdiv(jnp.maximum(last, 0), block_q), lo)
    hi = jnp.where(k_start < kv_end, hi, lo)
    full_lo = _clip(cdiv(jnp.asarray(full_first, jnp.int32), block_q), lo, hi)
    # A tile is mask-free only if all of its keys are valid; rows past q_end are harmless (above).
    keys_valid = k_start + block_k <= kv_end
    full_hi = jnp.where(keys_valid, hi if full_hi is None else full_hi, full_lo)
    full_hi = _clip(full_hi, full_lo, hi)
    return _with_segments(spec, (lo, full_lo, full_hi, hi), segment_range)


def _block_min_max(ids, block: int):
    """Per-block ``(min, max)`` of ``[B, L]`` ids, ``[B, cdiv(L, block)]`` each. The tail is padded
    with the row's last id, which keeps sorted rows sorted and adds no new id to the last block."""
    B, L = ids.shape
    pad = -L % block
    ids = jnp.pad(ids, ((0, 0), (0, pad)), mode="edge").reshape(B, -1, block)
    return ids.min(axis=-1), ids.max(axis=-1)


def _first_last(flags):
    """``(first, last + 1)`` of the True entries along the last axis; ``(0, 0)`` when there are none."""
    n = flags.shape[-1]
    any_ = flags.any(axis=-1)
    first = jnp.argmax(flags, axis=-1)
    last = n - jnp.argmax(flags[..., ::-1], axis=-1)
    return jnp.where(any_, first, 0), jnp.where(any_, last, 0)


def segment_block_ranges(outer_ids, inner_ids, block_outer: int, block_inner: int):
    """For every block of ``outer_ids`` (``[B, L]``), the blocks of ``inner_ids`` (``[B, M]``) to visit.

    Returns int32 ``[B, cdiv(L, block_outer), 4]``: ``(lo, full_lo, full_hi, hi)`` as in
    `kv_block_range`. ``[lo, hi)`` spans every inner block whose [min, max] id range meets the outer
    block's (a necessary condition for any shared id); ``[full_lo, full_hi)`` is a run of inner blocks
    that all hold the outer block's single id (empty unless every block of the run does). Call it with
    (query ids, key ids) for the forward and dQ kernels, (key ids, query ids) for dK/dV.
    """
    o_min, o_max = _block_min_max(outer_ids, block_outer)
    i_min, i_max = _block_min_max(inner_ids, block_inner)
    o_min, o_max = o_min[:, :, None], o_max[:, :, None]
    i_min, i_max = i_min[:, None, :], i_max[:, None, :]
    meets = (i_max >= o_min) & (i_min <= o_max)
    lo, hi = _first_last(meets)
    uniform = (o_min == o_max) & (i_min == i_max) & (i_min == o_min)
    full_lo, full_hi = _first_last(uniform)
    contiguous = uniform.sum(axis=-1) == full_hi - full_lo
    full_lo = jnp.where(contiguous, full_lo, 0)
    full_hi = jnp.where(contiguous, full_hi, 0)
    return jnp.stack([lo, full_lo, full_hi, hi], axis=-1).astype(jnp.int32)


def run_blocks(body, carry, block_range):
    """Runs ``body(index, carry, masked=...)`` over a ``kv_block_range``/``q_block_range`` result.

    Three loops, not one loop with a branch: the compiler then builds the mask-free loop body
    without any mask arithmetic.
    """
    lo, full_lo, full_hi, hi = block_range
    carry = lax.fori_loop(lo, full_lo, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
    return lax.fori_loop(full_hi, hi, functools.partial(body, masked=True), carry)
