"""FlashAttention forward kernel (Pallas, Triton backend).

FlashAttention-2 (Dao 2023), Algorithm 1: each program owns one ``block_q`` tile of queries of one
(batch, head) and streams the K/V tiles of its band past it, keeping a running row max ``m``, a
running row sum ``l`` and an unnormalised float32 accumulator. The N x N score matrix never reaches
HBM: memory is O(T * H) and HBM traffic O(T * S * H / block_q).

The softmax runs in base 2: ``exp(x) == exp2(x * log2(e))``, and ``exp2`` is one hardware
instruction, so ``scale * log2(e)`` is folded into a single multiply of the logits. The kernel also
writes the base-2 log-sum-exp ``m + log2(l)``, the only residual the backward needs besides O.

Caution: K/V heads are shared through the index maps (GQA/MQA), never repeated in memory; head
dims that are not powers of two are padded inside the tile, not in HBM.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_flash import masking
from pallas_flash.config import FlashStatics
from pallas_flash.tiles import load_tile, store_tile

LOG2_E = math.log2(math.e)


def dot_precision(dtype):
    """float32 inputs get true float32 dots (Triton would otherwise use tf32)."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def scaled_logits(statics: FlashStatics, dots):
    """Base-2 logits of a tile of raw ``q . k`` dots, and ``tanh(scale * dots / cap)`` when soft-capped
    (the backward's chain rule needs it: d logits / d dots = scale * (1 - tanh^2)), else None.

    The soft cap comes after the scale and before any mask, as in Gemma 2; masked logits are then
    replaced whole, so the cap never sees MASK_VALUE.
    """
    cap = statics.mask.soft_cap
    if cap is None:
        return dots * (statics.scale * LOG2_E), None
    t = jnp.tanh(dots * (statics.scale / cap))
    return t * (cap * LOG2_E), t


def add_bias(s, bias_tile):
    """Adds a natural-log bias tile to base-2 logits. Clamping at MASK_VALUE turns a -inf bias (an
    additive mask) into a masked logit, so a row of -inf keeps a finite max and stays NaN-free."""
    if bias_tile is None:
        return s
    return jnp.maximum(s + bias_tile.astype(jnp.float32) * LOG2_E, masking.MASK_VALUE)


def load_logit_tile(ref, *, q_start, q_tail, k_cols, k_start, kv_tail, other=0):
    """The ``[block_q | 1, block_k | 1]`` tile of a bias or mask array at key columns ``k_cols``
    (a ``pl.ds``), or None without one. A dimension of size 1 is a broadcast dimension (its BlockSpec
    always points at block 0), so its one row or column serves the whole tile; rows and columns
    past the sequence ends read as ``other``."""
    if ref is None:
        return None
    rows_bcast, cols_bcast = ref.shape[0] == 1, ref.shape[1] == 1
    view = ref if cols_bcast else ref.at[:, k_cols]
    return load_tile(view, first_row=q_start, valid_rows=None if rows_bcast else q_tail,
                     first_col=None if cols_bcast else k_start,
                     valid_cols=None if cols_bcast else kv_tail, other=other)


def logit_array_spec(x, block_q: int, kv_rows: int, q_block):
    """BlockSpec of a ``[B|1, N|1, T|1, S|1]`` bias or mask for a grid ``(q block, batch, head)``:
    broadcast dimensions stay size 1 and map to block 0, so the broadcast is never materialised."""
    if x is None:
        return None
    Bb, Nb, Tb, Sb = x.shape
    shape = (None, None, block_q if Tb > 1 else 1, kv_rows if Sb > 1 else 1)
    return pl.BlockSpec(shape, lambda i, b, n: (b if Bb > 1 else 0, n if Nb > 1 else 0,
                                                q_block(i) if Tb > 1 else 0, 0))


def load_segments(ref, *, first_row, valid_rows):
    """A tile of segment ids; rows past the sequence end read as -1 (they are masked elsewhere, but
    Triton loads have no bounds check, so they must not be read at all)."""
    if ref is None:
        return None
    return load_tile(ref, first_row=first_row, valid_rows=valid_rows, other=-1)


def load_segment_range(ref):
    """This program's `masking.segment_block_ranges` row, or None without segment ids."""
    return None if ref is None else ref[...]


def mask_key_tile(statics: FlashStatics, s, *, q_pos, q_seg, kv_seg_ref, k_rows, k_start, kv_end,
                  kv_tail, mask_tile, block_k: int):
    """Applies `masking.tile_mask` to a ``[block_q, block_k]`` logit tile whose keys start at
    ``k_start`` (the forward's and the dQ kernel's orientation)."""
    spec = statics.mask
    k_pos = (k_start + jnp.arange(block_k, dtype=jnp.int32))[None, :]
    k_seg = None
    if kv_seg_ref is not None:
        k_seg = load_segments(kv_seg_ref.at[k_rows], first_row=k_start, valid_rows=kv_tail)[None, :]
    visible = masking.tile_mask(spec, q_pos, k_pos, kv_end, q_seg=q_seg, k_seg=k_seg, mask_tile=mask_tile,
                                check_kv_end=spec.needs_kv_bound(block_k))
    return s if visible is None else jnp.where(visible, s, masking.MASK_VALUE)


def sequence_bounds(statics: FlashStatics, q_lengths_ref, kv_lengths_ref):
    """Valid query rows and key columns of this program's batch row."""
    spec = statics.mask
    q_end = spec.q_len
    kv_end = spec.kv_len
    if q_lengths_ref is not None:
        q_end = jnp.clip(q_lengths_ref[...], 0, spec.q_len)
    if kv_lengths_ref is not None:
        kv_end = jnp.clip(kv_lengths_ref[...], 0, spec.kv_len)
    return q_end, kv_end


def q_block_index(statics: FlashStatics, i):
    """Causal rows get longer with the block index; launching the longest first trims the tail
    of the last wave of programs."""
    if statics.mask.is_causal:
        return pl.cdiv(statics.mask.q_len, statics.tuning.block_q) - 1 - i
    return i


def _forward_kernel(q_ref, k_ref, v_ref, q_lengths_ref, kv_lengths_ref, q_seg_ref, kv_seg_ref,
                    seg_range_ref, bias_ref, mask_ref, o_ref, lse_ref, *, statics: FlashStatics):
    spec, tuning = statics.mask, statics.tuning
    block_q, block_k = tuning.block_q, tuning.block_k
    head_dim = statics.head_dim
    precision = dot_precision(q_ref.dtype)

    q_start = q_block_index(statics, pl.program_id(0)) * block_q
    q_end, kv_end = sequence_bounds(statics, q_lengths_ref, kv_lengths_ref)
    q_tail = spec.q_len if spec.q_len % block_q else None
    kv_tail = spec.kv_len if spec.kv_len % block_k else None

    q = load_tile(q_ref, first_row=q_start, valid_rows=q_tail, valid_cols=head_dim)
    q_pos = (q_start + jnp.arange(block_q, dtype=jnp.int32))[:, None]
    q_seg = load_segments(q_seg_ref, first_row=q_start, valid_rows=q_tail)
    q_seg = None if q_seg is None else q_seg[:, None]

    def body(kb, carry, *, masked):
        acc, m_prev, l_prev = carry
        k_start = kb * block_k
        rows = pl.ds(pl.multiple_of(k_start, block_k), block_k)
        tail = kv_tail if masked else None
        k = load_tile(k_ref.at[rows, :], first_row=k_start, valid_rows=tail, valid_cols=head_dim)
        s, _ = scaled_logits(statics, plgpu.dot(q, k, trans_b=True, precision=precision))  # base 2
        tile = dict(q_start=q_start, q_tail=q_tail, k_cols=rows, k_start=k_start, kv_tail=tail)
        s = add_bias(s, load_logit_tile(bias_ref, **tile))
        if masked:
            s = mask_key_tile(statics, s, q_pos=q_pos, q_seg=q_seg, kv_seg_ref=kv_seg_ref, k_rows=rows,
                              k_start=k_start, kv_end=kv_end, kv_tail=kv_tail,
                              mask_tile=load_logit_tile(mask_ref, **tile), block_k=block_k)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
        alpha = jnp.exp2(m_prev - m_next)  # rescales what was summed under the old max
        p = jnp.exp2(s - m_next[:, None])
        l_next = l_prev * alpha + jnp.sum(p, axis=1)
        v = load_tile(v_ref.at[rows, :], first_row=k_start, valid_rows=tail, valid_cols=head_dim)
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v, precision=precision)
        return acc, m_next, l_next

    padded = statics.head_dim_padded
    carry = (jnp.zeros((block_q, padded), jnp.float32),
             jnp.full((block_q,), -jnp.inf, jnp.float32),
             jnp.zeros((block_q,), jnp.float32))
    block_range = masking.kv_block_range(spec, q_start, q_end, kv_end, block_q, block_k,
                                         segment_range=load_segment_range(seg_range_ref))
    acc, m, l = masking.run_blocks(body, carry, block_range)

    # A row that met no visible key kept m at -inf (no tile) or at MASK_VALUE (only masked tiles).
    empty = m <= 0.5 * masking.MASK_VALUE
    if statics.mask.has_q_lengths:
        empty = empty | (q_pos[:, 0] >= q_end)
    l_safe = jnp.where(empty, 1.0, l)
    inv_l = jnp.where(empty, 0.0, 1.0 / l_safe)  # one reciprocal per row, not one divide per element
    out = acc * inv_l[:, None]
    store_tile(o_ref, out.astype(o_ref.dtype), first_row=q_start, valid_rows=q_tail, valid_cols=head_dim)
    lse = jnp.where(empty, -jnp.inf, m + jnp.log2(l_safe))
    store_tile(lse_ref, lse, first_row=q_start, valid_rows=q_tail)


def length_spec(lengths, index_map):
    return None if lengths is None else pl.BlockSpec((None,), index_map)


def segment_specs(segments, block_outer: int, block_inner: int, inner_rows: int, outer_block):
    """Inputs and BlockSpecs for the segment ids of a kernel whose programs own ``block_outer`` rows
    of one side and loop over ``block_inner`` rows of the other.

    ``segments`` is ``(outer_ids [B, L], inner_ids [B, M])`` or None; ``inner_rows`` is the padded
    inner length; ``outer_block(i)`` maps the first grid index to a block (the grid is (i, b, head)).
    Returns ``(arrays, specs)``: the outer ids tile, the whole inner id row and the per-outer-block
    ranges of `masking.segment_block_ranges` (all None without segment ids).
    """
    if segments is None:
        return (None, None, None), (None, None, None)
    outer_ids, inner_ids = segments
    ranges = masking.segment_block_ranges(outer_ids, inner_ids, block_outer, block_inner)
    specs = (pl.BlockSpec((None, block_outer), lambda i, b, n: (b, outer_block(i))),
             pl.BlockSpec((None, inner_rows), lambda i, b, n: (b, 0)),
             pl.BlockSpec((None, None, 4), lambda i, b, n: (b, outer_block(i), 0)))
    return (outer_ids, inner_ids, ranges), specs


def flash_forward(q, k, v, q_lengths, kv_lengths, segments=None, bias=None, mask=None, *,
                  statics: FlashStatics):
    """Returns ``(out [B, T, N, H], lse2 [B, N, T] float32)``; lse2 is the base-2 log-sum-exp of the
    scaled logits, -inf on rows that see no key. ``segments`` is ``(q_ids [B, T], kv_ids [B, S])``
    int32 or None; ``bias``/``mask`` are ``[B|1, N|1, T|1, S|1]`` (the mask as int8) or None."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    groups = N // K
    tuning = statics.tuning
    block_q, block_k = tuning.block_q, tuning.block_k
    padded = statics.head_dim_padded
    num_q_blocks = pl.cdiv(T, block_q)
    kv_rows = pl.cdiv(S, block_k) * block_k
    q_block = functools.partial(q_block_index, statics)

    kernel = functools.partial(_forward_kernel, statics=statics)
    seg_arrays, seg_specs = segment_specs(segments, block_q, block_k, kv_rows, q_block)
    in_specs = [
        pl.BlockSpec((None, block_q, None, padded), lambda i, b, n: (b, q_block(i), n, 0)),
        pl.BlockSpec((None, kv_rows, None, padded), lambda i, b, n: (b, 0, n // groups, 0)),
        pl.BlockSpec((None, kv_rows, None, padded), lambda i, b, n: (b, 0, n // groups, 0)),
        length_spec(q_lengths, lambda i, b, n: (b,)),
        length_spec(kv_lengths, lambda i, b, n: (b,)),
        *seg_specs,
        logit_array_spec(bias, block_q, kv_rows, q_block),
        logit_array_spec(mask, block_q, kv_rows, q_block),
    ]
    out_specs = [
        pl.BlockSpec((None, block_q, None, padded), lambda i, b, n: (b, q_block(i), n, 0)),
        pl.BlockSpec((None, None, block_q), lambda i, b, n: (b, n, q_block(i))),
    ]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((B, N, T), jnp.float32)]
    return pl.pallas_call(
        kernel,
        grid=(num_q_blocks, B, N),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=tuning.num_warps, num_stages=tuning.num_stages),
        interpret=statics.interpret,
        name="pallas_flash_forward",
    )(q, k, v, q_lengths, kv_lengths, *seg_arrays, bias, mask)
