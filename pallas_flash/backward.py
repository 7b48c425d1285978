"""FlashAttention backward kernels (Pallas, Triton backend).

FlashAttention-2 (Dao 2023), Algorithm 2, split in three launches so that no program ever writes
where another one does (no atomics, so gradients are bitwise deterministic):

1. ``delta = rowsum(dO * O)`` per query row, the softmax-Jacobian term of section 3.2;
2. dK/dV: each program keeps one ``block_k_dkv`` slab of K/V resident and streams Q, dO, the
   log-sum-exp and delta of *every query head of its K/V head* past it, so grouped-query heads are
   summed inside one program instead of by atomics or a repeat-then-sum;
3. dQ: each program keeps one ``block_q_dq`` tile of Q/dO and streams K/V, like the forward.

The probabilities are recomputed from the forward's base-2 log-sum-exp: ``P = exp2(S*c - lse2)``.
Rows that saw no key carry ``lse2 = -inf``; it is read back as ``+inf`` so that their P is exactly
zero and they contribute nothing, with no special case in the loops.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_flash import masking
from pallas_flash.config import FlashStatics
from pallas_flash.forward import (length_spec, add_bias, dot_precision, load_logit_tile,
                                  load_segment_range, load_segments, logit_array_spec, mask_key_tile,
                                  scaled_logits, segment_specs, sequence_bounds)
from pallas_flash.tiles import load_tile, store_tile


def _load_lse(view, *, first_row, valid_rows):
    lse = load_tile(view, first_row=first_row, valid_rows=valid_rows, other=jnp.inf)
    return jnp.where(lse == -jnp.inf, jnp.inf, lse)


def _delta_kernel(o_ref, do_ref, delta_ref, *, block_q: int, q_len: int, head_dim: int):
    q_start = pl.program_id(0) * block_q
    tail = q_len if q_len % block_q else None
    o = load_tile(o_ref, first_row=q_start, valid_rows=tail, valid_cols=head_dim).astype(jnp.float32)
    do = load_tile(do_ref, first_row=q_start, valid_rows=tail, valid_cols=head_dim).astype(jnp.float32)
    store_tile(delta_ref, jnp.sum(o * do, axis=1), first_row=q_start, valid_rows=tail)


def _soft_cap_grad(ds, tanh):
    """Chain rule through ``cap * tanh(x / cap)``: its derivative is ``1 - tanh^2``."""
    return ds if tanh is None else ds * (1.0 - tanh * tanh)


def _load_logit_tile_t(ref, g, *, q_rows, q_start, q_tail, k_start, kv_tail):
    """The dK/dV kernel's ``[block_k | 1, block_q | 1]`` (transposed) tile of a bias or mask laid
    out ``[G | 1, T | 1, block_k | 1]`` for this program, at query head ``g`` of the group."""
    if ref is None:
        return None
    # A traced index even for a broadcast head: a Python int index trips interpret mode's loads.
    head = g if ref.shape[0] > 1 else jnp.asarray(0, jnp.int32)
    rows_bcast, cols_bcast = ref.shape[1] == 1, ref.shape[2] == 1
    view = ref.at[head] if rows_bcast else ref.at[head, q_rows, :]
    tile = load_tile(view, first_row=q_start, valid_rows=None if rows_bcast else q_tail,
                     first_col=None if cols_bcast else k_start,
                     valid_cols=None if cols_bcast else kv_tail, other=0)
    return tile.T


def _dkdv_logit_spec(x, q_rows: int, block_k: int):
    """BlockSpec of a bias or mask reshaped ``[B|1, K|1, G|1, T|1, S|1]`` for the dK/dV grid
    ``(key block, batch, K/V head)``: every query head of the group, broadcast dims at block 0."""
    if x is None:
        return None
    Bb, Kb, Gb, Tb, Sb = x.shape
    shape = (None, None, Gb, q_rows if Tb > 1 else 1, block_k if Sb > 1 else 1)
    return pl.BlockSpec(shape, lambda j, b, h: (b if Bb > 1 else 0, h if Kb > 1 else 0, 0, 0,
                                                j if Sb > 1 else 0))


def _group_heads(x, num_heads: int, kv_heads: int):
    """``[B|1, N|1, T|1, S|1]`` -> ``[B|1, K|1, G|1, T|1, S|1]`` (a free reshape)."""
    if x is None:
        return None
    if x.shape[1] == 1:
        return x[:, :, None]
    return x.reshape(x.shape[0], kv_heads, num_heads // kv_heads, *x.shape[2:])


def _dkdv_kernel(q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, q_lengths_ref, kv_lengths_ref,
                 kv_seg_ref, q_seg_ref, seg_range_ref, bias_ref, mask_ref, dk_ref, dv_ref, *,
                 statics: FlashStatics):
    spec, tuning = statics.mask, statics.tuning
    block_q, block_k = tuning.block_q_dkv, tuning.block_k_dkv
    head_dim, groups = statics.head_dim, q_ref.shape[1]
    precision = dot_precision(q_ref.dtype)

    k_start = pl.program_id(0) * block_k
    q_end, kv_end = sequence_bounds(statics, q_lengths_ref, kv_lengths_ref)
    q_tail = spec.q_len if spec.q_len % block_q else None
    kv_tail = spec.kv_len if spec.kv_len % block_k else None
    k = load_tile(k_ref, first_row=k_start, valid_rows=kv_tail, valid_cols=head_dim)
    v = load_tile(v_ref, first_row=k_start, valid_rows=kv_tail, valid_cols=head_dim)
    k_pos = (k_start + jnp.arange(block_k, dtype=jnp.int32))[:, None]
    k_seg = load_segments(kv_seg_ref, first_row=k_start, valid_rows=kv_tail)
    k_seg = None if k_seg is None else k_seg[:, None]
    block_range = masking.q_block_range(spec, k_start, q_end, kv_end, block_q, block_k,
                                        segment_range=load_segment_range(seg_range_ref))

    def head(g, carry):
        def body(qb, carry, *, masked):
            dk, dv = carry
            q_start = qb * block_q
            rows = pl.ds(pl.multiple_of(q_start, block_q), block_q)
            tile = dict(first_row=q_start, valid_rows=q_tail)
            q = load_tile(q_ref.at[rows, g, :], valid_cols=head_dim, **tile)
            do = load_tile(do_ref.at[rows, g, :], valid_cols=head_dim, **tile)
            lse = _load_lse(lse_ref.at[g, rows], **tile)
            delta = load_tile(delta_ref.at[g, rows], **tile)
            s_t, tanh_t = scaled_logits(statics, plgpu.dot(k, q, trans_b=True, precision=precision))
            logit_tile = dict(q_rows=rows, q_start=q_start, q_tail=q_tail, k_start=k_start,
                              kv_tail=kv_tail)
            s_t = add_bias(s_t, _load_logit_tile_t(bias_ref, g, **logit_tile))
            if masked:
                q_pos = (q_start + jnp.arange(block_q, dtype=jnp.int32))[None, :]
                q_seg = None
                if q_seg_ref is not None:
                    q_seg = load_segments(q_seg_ref.at[rows], first_row=q_start, valid_rows=q_tail)[None, :]
                visible = masking.tile_mask(spec, q_pos, k_pos, kv_end, q_seg=q_seg, k_seg=k_seg,
                                            mask_tile=_load_logit_tile_t(mask_ref, g, **logit_tile),
                                            check_kv_end=spec.needs_kv_bound(block_k))
                if visible is not None:
                    s_t = jnp.where(visible, s_t, masking.MASK_VALUE)
            p_t = jnp.exp2(s_t - lse[None, :])
            dv = dv + plgpu.dot(p_t.astype(do.dtype), do, precision=precision)
            dp_t = plgpu.dot(v, do, trans_b=True, precision=precision)
            ds_t = _soft_cap_grad(p_t * (dp_t - delta[None, :]), tanh_t)
            dk = dk + plgpu.dot(ds_t.astype(q.dtype), q, precision=precision)
            return dk, dv

        return masking.run_blocks(body, carry, block_range)

    padded = statics.head_dim_padded
    zeros = jnp.zeros((block_k, padded), jnp.float32)
    dk, dv = lax.fori_loop(0, groups, head, (zeros, zeros))
    store = dict(first_row=k_start, valid_rows=kv_tail, valid_cols=head_dim)
    store_tile(dk_ref, (dk * statics.scale).astype(dk_ref.dtype), **store)
    store_tile(dv_ref, dv.astype(dv_ref.dtype), **store)


def _dq_kernel(q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, q_lengths_ref, kv_lengths_ref,
               q_seg_ref, kv_seg_ref, seg_range_ref, bias_ref, mask_ref, dq_ref, ds_ref=None, *,
               statics: FlashStatics):
    """``ds_ref`` (with a bias only) receives the logit gradient of every tile, ``[block_q, S]`` per
    program: the bias gradient before its broadcast dims are summed."""
    spec, tuning = statics.mask, statics.tuning
    block_q, block_k = tuning.block_q_dq, tuning.block_k_dq
    head_dim = statics.head_dim
    precision = dot_precision(q_ref.dtype)

    q_start = pl.program_id(0) * block_q
    q_end, kv_end = sequence_bounds(statics, q_lengths_ref, kv_lengths_ref)
    q_tail = spec.q_len if spec.q_len % block_q else None
    kv_tail = spec.kv_len if spec.kv_len % block_k else None
    tile = dict(first_row=q_start, valid_rows=q_tail)
    q = load_tile(q_ref, valid_cols=head_dim, **tile)
    do = load_tile(do_ref, valid_cols=head_dim, **tile)
    lse = _load_lse(lse_ref, **tile)
    delta = load_tile(delta_ref, **tile)
    q_pos = (q_start + jnp.arange(block_q, dtype=jnp.int32))[:, None]
    q_seg = load_segments(q_seg_ref, first_row=q_start, valid_rows=q_tail)
    q_seg = None if q_seg is None else q_seg[:, None]

    def body(kb, dq, *, masked):
        k_start = kb * block_k
        rows = pl.ds(pl.multiple_of(k_start, block_k), block_k)
        tail = kv_tail if masked else None
        k = load_tile(k_ref.at[rows, :], first_row=k_start, valid_rows=tail, valid_cols=head_dim)
        v = load_tile(v_ref.at[rows, :], first_row=k_start, valid_rows=tail, valid_cols=head_dim)
        s, tanh = scaled_logits(statics, plgpu.dot(q, k, trans_b=True, precision=precision))
        logit_tile = dict(q_start=q_start, q_tail=q_tail, k_cols=rows, k_start=k_start, kv_tail=tail)
        s = add_bias(s, load_logit_tile(bias_ref, **logit_tile))
        if masked:
            s = mask_key_tile(statics, s, q_pos=q_pos, q_seg=q_seg, kv_seg_ref=kv_seg_ref, k_rows=rows,
                              k_start=k_start, kv_end=kv_end, kv_tail=kv_tail,
                              mask_tile=load_logit_tile(mask_ref, **logit_tile), block_k=block_k)
        p = jnp.exp2(s - lse[:, None])
        dp = plgpu.dot(do, v, trans_b=True, precision=precision)
        ds = p * (dp - delta[:, None])  # d loss / d (capped logit + bias)
        if ds_ref is not None:
            store_tile(ds_ref.at[:, rows], ds, first_row=q_start, valid_rows=q_tail, first_col=k_start,
                       valid_cols=tail)
        ds = _soft_cap_grad(ds, tanh)
        return dq + plgpu.dot(ds.astype(k.dtype), k, precision=precision)

    block_range = masking.kv_block_range(spec, q_start, q_end, kv_end, block_q, block_k,
                                         segment_range=load_segment_range(seg_range_ref))
    if ds_ref is not None:
        # Skipped tiles are never visited, but their (zero) bias gradient must still be written.
        # Only those outside the visited range [lo, hi): a tile stored twice by one program could
        # land in either order on a GPU, whose threads need not own the same elements both times.
        zeros = jnp.zeros((block_q, block_k), jnp.float32)

        def zero_fill(kb, carry):
            cols = pl.ds(pl.multiple_of(kb * block_k, block_k), block_k)
            store_tile(ds_ref.at[:, cols], zeros, first_row=q_start, valid_rows=q_tail,
                       first_col=kb * block_k, valid_cols=kv_tail)
            return carry

        lax.fori_loop(0, block_range[0], zero_fill, 0)
        lax.fori_loop(block_range[3], pl.cdiv(spec.kv_len, block_k), zero_fill, 0)
    dq = masking.run_blocks(body, jnp.zeros((block_q, statics.head_dim_padded), jnp.float32), block_range)
    store_tile(dq_ref, (dq * statics.scale).astype(dq_ref.dtype), valid_cols=head_dim, **tile)


def flash_backward(q, k, v, q_lengths, kv_lengths, segments, bias, mask, out, lse, d_out, *,
                   statics: FlashStatics, bias_grad: bool = True):
    """Returns ``(dq, dk, dv, dbias)`` for the forward's ``(out, lse2)`` and the output cotangent;
    ``segments``, ``bias`` and ``mask`` as in `forward.flash_forward`; dbias is None without a bias
    or when ``bias_grad`` is False (nothing differentiates the bias: skip its T x S buffer)."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    groups = N // K
    tuning = statics.tuning
    padded = statics.head_dim_padded
    interpret = statics.interpret
    d_out = d_out.astype(q.dtype)

    block_q = tuning.block_q_dq
    num_q_blocks = pl.cdiv(T, block_q)
    tile_spec = pl.BlockSpec((None, block_q, None, padded), lambda i, b, n: (b, i, n, 0))
    row_spec = pl.BlockSpec((None, None, block_q), lambda i, b, n: (b, n, i))
    delta = pl.pallas_call(
        functools.partial(_delta_kernel, block_q=block_q, q_len=T, head_dim=H),
        grid=(num_q_blocks, B, N),
        in_specs=[tile_spec, tile_spec],
        out_specs=row_spec,
        out_shape=jax.ShapeDtypeStruct((B, N, T), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="pallas_flash_backward_delta",
    )(out, d_out)

    # dK/dV: Q-side operands grouped per K/V head, [B, T, K, G, H] and [B, K, G, T] (free reshapes).
    block_q_dkv, block_k_dkv = tuning.block_q_dkv, tuning.block_k_dkv
    q_rows = pl.cdiv(T, block_q_dkv) * block_q_dkv
    grouped_spec = pl.BlockSpec((None, q_rows, None, groups, padded), lambda j, b, h: (b, 0, h, 0, 0))
    grouped_rows_spec = pl.BlockSpec((None, None, groups, q_rows), lambda j, b, h: (b, h, 0, 0))
    kv_spec = pl.BlockSpec((None, block_k_dkv, None, padded), lambda j, b, h: (b, j, h, 0))
    grouped_bias, grouped_mask = _group_heads(bias, N, K), _group_heads(mask, N, K)
    dkdv_seg_arrays, dkdv_seg_specs = segment_specs(
        None if segments is None else segments[::-1], block_k_dkv, block_q_dkv, q_rows, lambda j: j)
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, statics=statics),
        grid=(pl.cdiv(S, block_k_dkv), B, K),
        in_specs=[grouped_spec, grouped_spec, grouped_rows_spec, grouped_rows_spec, kv_spec, kv_spec,
                  length_spec(q_lengths, lambda j, b, h: (b,)),
                  length_spec(kv_lengths, lambda j, b, h: (b,)), *dkdv_seg_specs,
                  _dkdv_logit_spec(grouped_bias, q_rows, block_k_dkv),
                  _dkdv_logit_spec(grouped_mask, q_rows, block_k_dkv)],
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=plgpu.CompilerParams(num_warps=tuning.num_warps_bwd,
                                             num_stages=tuning.num_stages_bwd),
        interpret=interpret,
        name="pallas_flash_backward_dkdv",
    )(q.reshape(B, T, K, groups, H), d_out.reshape(B, T, K, groups, H),
      lse.reshape(B, K, groups, T), delta.reshape(B, K, groups, T), k, v, q_lengths, kv_lengths,
      *dkdv_seg_arrays, grouped_bias, grouped_mask)

    block_k_dq = tuning.block_k_dq
    kv_rows = pl.cdiv(S, block_k_dq) * block_k_dq
    full_kv_spec = pl.BlockSpec((None, kv_rows, None, padded), lambda i, b, n: (b, 0, n // groups, 0))
    dq_seg_arrays, dq_seg_specs = segment_specs(segments, block_q, block_k_dq, kv_rows, lambda i: i)
    out_specs, out_shape = tile_spec, jax.ShapeDtypeStruct(q.shape, q.dtype)
    bias_grad = bias is not None and bias_grad
    if bias_grad:
        # The full [B, N, T, S] logit gradient, summed over the bias's broadcast dims below.
        out_specs = [tile_spec, pl.BlockSpec((None, None, block_q, kv_rows), lambda i, b, n: (b, n, i, 0))]
        out_shape = [out_shape, jax.ShapeDtypeStruct((B, N, T, S), jnp.float32)]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, statics=statics),
        grid=(num_q_blocks, B, N),
        in_specs=[tile_spec, tile_spec, row_spec, row_spec, full_kv_spec, full_kv_spec,
                  length_spec(q_lengths, lambda i, b, n: (b,)),
                  length_spec(kv_lengths, lambda i, b, n: (b,)), *dq_seg_specs,
                  logit_array_spec(bias, block_q, kv_rows, lambda i: i),
                  logit_array_spec(mask, block_q, kv_rows, lambda i: i)],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=tuning.num_warps_bwd,
                                             num_stages=tuning.num_stages_bwd),
        interpret=interpret,
        name="pallas_flash_backward_dq",
    )(q, d_out, lse, delta, k, v, q_lengths, kv_lengths, *dq_seg_arrays, bias, mask)
    if not bias_grad:
        return dq, dk, dv, None
    dq, ds = dq
    broadcast = tuple(d for d in range(4) if bias.shape[d] == 1 and ds.shape[d] != 1)
    dbias = jnp.sum(ds, axis=broadcast, keepdims=True).astype(bias.dtype)
    return dq, dk, dv, dbias
