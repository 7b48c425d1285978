"""Which logits survive: the one place that decides, for the forward, dK/dV and dQ kernels alike.

Query row ``i`` (0 <= i < T) may attend key column ``j`` (0 <= j < S) iff all of these hold:

* ``i < query_seq_lengths[b]`` and ``j < key_value_seq_lengths[b]`` (when given);
* ``j <= i`` when causal;
* ``i - left <= j <= i + right`` for ``local_window_size=(left, right)``.

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

    def needs_kv_bound(self, block_k: int) -> bool:
        """Whether a key tile can reach past the last valid key."""
        return self.has_kv_lengths or self.kv_len % block_k != 0


def _cdiv(x, d: int):
    """Ceil division of a non-negative traced int by a static int."""
    return lax.div(x + (d - 1), d)


def _clip(x, lo, hi):
    return jnp.minimum(jnp.maximum(x, lo), hi)


def tile_mask(spec: MaskSpec, q_pos, k_pos, kv_end, *, check_kv_end: bool):
    """Boolean visibility of a tile, or None when every position of any tile is visible.

    ``q_pos`` is ``(bq, 1)`` and ``k_pos`` is ``(1, bk)`` (absolute positions); ``kv_end`` is the
    number of valid keys of this batch row.
    """
    conditions = []
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


def kv_block_range(spec: MaskSpec, q_start, q_end, kv_end, block_q: int, block_k: int):
    """Key blocks a query block must visit, as ``(lo, full_lo, full_hi, hi)``.

    Blocks in ``[lo, hi)`` hold at least one visible logit; those in ``[full_lo, full_hi)`` hold only
    visible logits and skip the element-wise mask. ``q_end`` is the number of valid query rows.
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
    hi = jnp.maximum(_cdiv(jnp.maximum(last, 0), block_k), lo)
    if spec.has_q_lengths:
        hi = jnp.where(q_start < q_end, hi, lo)
    full_lo = _clip(_cdiv(jnp.asarray(full_first, jnp.int32), block_k), lo, hi)
    full_hi = _clip(lax.div(jnp.maximum(full_last, 0), block_k), full_lo, hi)
    return lo, full_lo, full_hi, hi


def q_block_range(spec: MaskSpec, k_start, q_end, kv_end, block_q: int, block_k: int):
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
    hi = jnp.maximum(_cdiv(jnp.maximum(last, 0), block_q), lo)
    hi = jnp.where(k_start < kv_end, hi, lo)
    full_lo = _clip(_cdiv(jnp.asarray(full_first, jnp.int32), block_q), lo, hi)
    # A tile is mask-free only if all of its keys are valid; rows past q_end are harmless (above).
    keys_valid = k_start + block_k <= kv_end
    full_hi = jnp.where(keys_valid, hi if full_hi is None else full_hi, full_lo)
    full_hi = _clip(full_hi, full_lo, hi)
    return lo, full_lo, full_hi, hi


def run_blocks(body, carry, block_range):
    """Runs ``body(index, carry, masked=...)`` over a ``kv_block_range``/``q_block_range`` result.

    Three loops, not one loop with a branch: the compiler then builds the mask-free loop body
    without any mask arithmetic.
    """
    lo, full_lo, full_hi, hi = block_range
    carry = lax.fori_loop(lo, full_lo, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
    return lax.fori_loop(full_hi, hi, functools.partial(body, masked=True), carry)
