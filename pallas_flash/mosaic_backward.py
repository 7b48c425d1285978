"""FlashAttention backward for Hopper (Pallas, Mosaic GPU backend), on the forward's machinery.

FlashAttention-2 (Dao 2023), Algorithm 2, as two warp-specialised kernels with no atomics (or as
one with integer reduce-adds: "Fused dQ" below), so the gradients are bitwise deterministic:

* dK/dV: each of two consumer warpgroups keeps ``block_kv_dkv`` rows of K and V resident in shared
  memory and float32 dK/dV accumulators in registers; a producer warpgroup streams Q, dO, the
  base-2 log-sum-exp and delta tiles of *every query head of the K/V head* through a TMA ring, so
  grouped-query heads are summed inside the CTA instead of by a repeat-then-sum in HBM.
* dQ: each consumer keeps ``block_q_dq`` rows of Q and dO and a float32 dQ accumulator; the
  producer streams K/V tiles, as in the forward.

All four products per tile run on ``wgmma``: ``S^T = K Q^T`` and ``dP^T = V dO^T`` from shared
memory, ``dV += P^T dO`` and ``dK += dS^T Q`` with P and dS straight from registers. Both kernels
form P while dP's product is still in flight (`mosaic_forward.mma_first`), and at head dim 128 start
dP's accumulator at ``-delta`` (`MosaicConfig.delta_in_acc`), so ``dS = P (dP - delta)`` is one
multiply once dP lands.

Head dims above 128 ("split"): two 64 x 256 float32 accumulators would need 256 registers per
thread, and two consumers' resident tiles next to a two-slot ring would overflow shared memory, so
the two consumers of a CTA share one block instead of owning one each. In the dK/dV kernel
consumer 0 forms S^T, P^T and dV, and hands P^T through shared memory to consumer 1, which forms
dP^T, dS^T and dK: still four products per tile pair, split two and two, where separate dV and dK
passes took five (+16 to +20% fwd+bwd at head dim 256; NOTES.md, session 10). The dQ kernel keeps
one consumer per CTA there: its Q and dO tiles next to the K/V ring fill shared memory, and the same
split of its work (P and dS handed over, dQ's columns halved) measured no faster.

Causal masking skips every tile that lies wholly above the diagonal and masks only those that
straddle it. The two consumers of a CTA own different rows, so one may skip steps that the other
computes: it still waits for each tile and releases it, which keeps every barrier's phases in step.

Per-row sequence lengths (`MosaicStatics.seq_lengths`): a dK/dV CTA streams only the query tiles up
to its row's query length, none when all its keys lie past the key length, and masks every step of
a consumer whose keys straddle it; a dQ CTA visits only the key tiles up to the key length, none
when all its rows lie past the query length. Rows that see no key get P = 0 (an lse of +inf).

Fused dQ (``MosaicConfig.fuse_dq``, head dims up to 128; the default for non-causal rows from 16k
queries): the dK/dV kernel also forms dQ = dS K from both consumers' dS^T tiles in shared memory,
one step behind its dK and dV products, and adds it to HBM with TMA reduce-adds as one int32 per
element: fixed point, relative to a per-row power of two that bounds every partial sum
(`_row_multipliers`). The dQ kernel and its recomputation of S and dP go away (five products per
tile pair instead of seven), and the result stays bitwise deterministic, since integer addition is
associative. Each K/V CTA's truncation costs less than 2^-30 of the row's bound.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_flash.config import MosaicStatics, dq_split, splits_backward
from pallas_flash.mosaic_forward import (LOG2_E, _CONSUMER_REGISTERS, _PRODUCER_REGISTERS, drain, kv_steps,
                                         launch, mma, mma_first, mma_into, produce, smem_transforms)


# The dK/dV kernel runs two consumer warpgroups and a producer warpgroup ("wg" 2).
_CONSUMERS = 2


def _dq_slab(statics: MosaicStatics, w):
    """(rows, cols) of consumer ``w``'s share of a fused step's ``block_q_dkv x H`` dQ tile (``w``
    a Python int, or the traced warpgroup index for the row slice of per-row values)."""
    block_q, hp = statics.config.block_q_dkv, statics.head_dim_padded
    if dq_split(block_q, hp) == "rows":
        return pl.ds(w * (block_q // 2), block_q // 2), pl.ds(0, hp)
    return pl.ds(0, block_q), pl.ds(w * (hp // 2), hp // 2)


def _kv_ctas(statics: MosaicStatics) -> int:
    return statics.kv_len_padded // (2 * statics.config.block_kv_dkv)


# A row's dQ partial sums, times its multiplier, stay below 2^_FIXED_POINT_BITS (`_row_multipliers`):
# every subset of the K/V CTAs' truncated partials then sums to less than int32's 2^31, the rounding
# of the bound and of the CTAs' bf16 operands included.
_FIXED_POINT_BITS = 30


def _row_multipliers(k, v, d_out, delta, groups: int):
    """Per query row, a power of two 2^e with |dS_i K| * 2^e <= 2^_FIXED_POINT_BITS for every subset
    of keys.

    dS_ij = P_ij (dP_ij - delta_i) with dP_ij = dO_i . V_j, so for any subset J of keys
    |sum_J dS_ij K_jh| <= max|K| sum_j P_ij (|dP_ij| + |delta_i|) <= max|K| (|dO_i| max_j |V_j| +
    |delta_i|), as sum_j P_ij <= 1. ``delta`` is ``[B, N, T]``. Returns ``(multiplier [B, N, T]
    float32, finite)``: rows whose bound is not finite (inf or NaN inputs) are flagged so the
    result can carry the NaN.
    """
    f32 = jnp.float32
    do_norm = jnp.sqrt(jnp.sum(jnp.square(d_out.astype(f32)), axis=-1))            # [B, T, N]
    v_norm = jnp.sqrt(jnp.max(jnp.sum(jnp.square(v.astype(f32)), axis=-1), axis=1))  # [B, K]
    k_max = jnp.max(jnp.abs(k.astype(f32)), axis=(1, 3))                                # [B, K]
    v_norm, k_max = (jnp.repeat(x, groups, axis=1)[:, :, None] for x in (v_norm, k_max))  # [B, N, 1]
    bound = (jnp.transpose(do_norm, (0, 2, 1)) * v_norm + jnp.abs(delta)) * k_max
    _, exponent = jnp.frexp(bound)  # bound <= 2^exponent
    # Clamped so 2^e stays a normal float32; bounds below 2^-70 lose bits, not correctness.
    e = jnp.clip(_FIXED_POINT_BITS - exponent, -100, 100)
    return jnp.ldexp(jnp.ones_like(bound), e), jnp.isfinite(bound)


def _fixed_point_dq(word, multipliers, finite, *, statics: MosaicStatics, shape):
    """dQ ``[B, T, N, H]`` from the int32 accumulator (the sum of every CTA's truncated partials)."""
    T, H = shape[1], shape[3]
    per_row = jnp.where(finite, statics.scale / multipliers, jnp.nan)[..., :T]  # exact: powers of two
    return word[:, :T, :, :H].astype(jnp.float32) * jnp.transpose(per_row, (0, 2, 1))[..., None]


def _visible(shape, *, row_offset, col_offset, causal: bool, key_len, keys_on_rows: bool):
    """Which logits of a tile a query may see: causal (key <= query) and, given ``key_len``, keys
    below it (``row_offset``/``col_offset``: the first row's and column's query or key index). The
    causal test compares one ``col - row`` tile against a scalar instead of two offset iota tiles
    against each other: the two-tile form made ptxas spill 408 bytes in the causal dQ kernel, this
    one 188 (NOTES.md, session 4)."""
    layout = plgpu.Layout.WGMMA
    rows = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=layout)
    cols = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=layout)
    visible = None
    if key_len is not None:
        keys, key_offset = (rows, row_offset) if keys_on_rows else (cols, col_offset)
        visible = keys < key_len - key_offset
    if causal:
        # keys_on_rows: row_offset + row <= col_offset + col; else col_offset + col <= row_offset + row.
        if keys_on_rows:
            diag = rows - cols <= col_offset - row_offset
        else:
            diag = cols - rows <= row_offset - col_offset
        visible = diag if visible is None else visible & diag
    return visible


def _dkv_kernel(q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, *refs, statics: MosaicStatics, outputs: str):
    """``outputs``: "dkdv" (each consumer its own key block), "split" (the two consumers share one
    key block: consumer 0 forms P^T and dV, consumer 1 dP^T and dK from P^T handed over in shared
    memory), or "dkdv_dq" (as "dkdv", and dQ added into a fixed-point accumulator,
    `_fixed_point_dq`)."""
    fuse = outputs == "dkdv_dq"
    split = outputs == "split"
    refs = list(refs)
    zero_smem = refs.pop() if fuse else None
    take = lambda present: refs.pop(0) if present else None
    lens_ref = take(statics.seq_lengths)
    mult_ref = take(fuse)
    acc_ref = take(fuse and not statics.interpret)
    dk_ref, dv_ref = refs.pop(0), refs.pop(0)
    if fuse and statics.interpret:
        acc_ref = refs.pop(0)
    k_smem2, v_smem2 = refs.pop(0), refs.pop(0)
    q_smem, do_smem, lse_smem, delta_smem = (refs.pop(0) for _ in range(4))
    mult_smem, ds_smem, stage_smem = take(fuse), take(fuse), take(fuse)
    pt_smem = take(split)
    kv_ready, tile_ready = refs.pop(0), refs.pop(0)
    pt_ready = take(split)
    ds_ready, ds_free = take(fuse), take(fuse)
    consumed, start = refs
    cfg = statics.config
    stagger = cfg.stagger_bwd and outputs == "dkdv"
    consumers = _CONSUMERS
    block_q, block_kv = cfg.block_q_dkv, cfg.block_kv_dkv
    causal, groups = statics.is_causal, statics.groups
    dtype = q_ref.dtype
    c = statics.scale * LOG2_E

    batch = lax.axis_index("batch")
    kv_head = lax.axis_index("heads")
    wg = lax.axis_index("wg")
    cta = lax.axis_index("kv_seq")
    cta_k0 = cta * (block_kv if split else consumers * block_kv)
    # Tiles of pure query padding add nothing, nor (with lengths) those past the query length, nor
    # any tile when every key of the CTA lies past the key length (dK = dV = 0 there).
    if lens_ref is None:
        num_q_tiles, kv_len = pl.cdiv(statics.q_len, block_q), None
    else:
        kv_len = lens_ref[1, batch]
        num_q_tiles = jnp.where(cta_k0 < kv_len, pl.cdiv(lens_ref[0, batch], block_q), 0)
    # Causal: query row i sees key j only if j <= i, so rows above this CTA's first key are skipped.
    first_tile = cta_k0 // block_q if causal else 0
    tiles = num_q_tiles - first_tile
    steps = groups * tiles
    stages = cfg.num_stages_bwd

    def step_tile(s):
        g = lax.div(s, tiles)
        return kv_head * groups + g, first_tile + s - g * tiles

    def add_dq(part, mult, w: int, head, t):
        """Consumer ``w``'s slab of a step's dQ tile (float32, relative to the row multipliers
        ``mult``) into the accumulator as one int32 per element, truncated: each CTA's partial
        loses less than one unit (2^-30 of the row's bound), and the integer sum is the same
        whatever order the CTAs' reduce-adds land in. Truncation is one conversion; rounding to
        nearest (`lax.round` first) cost the fused kernel 6% of its fwd+bwd rate (NOTES.md,
        session 28). The interpreter has no TMA reductions: there each CTA writes its own slice of
        a larger, zero-filled output, summed by `mosaic_backward`."""
        rows, cols = _dq_slab(statics, w)
        y = part * lax.broadcast_in_dim(mult, part.shape, [0])
        word = y.astype(jnp.int32)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous step's word is read
        stage_smem.at[w][...] = word
        plgpu.commit_smem()
        where = (batch, pl.ds(t * block_q + rows.start, rows.size), head, cols)
        dst = acc_ref.at[cta] if statics.interpret else acc_ref
        plgpu.copy_smem_to_gmem(stage_smem.at[w], dst.at[where], reduction_op=None if statics.interpret else "add")

    def consume(w, *, dk: bool, dv: bool):
        """Consumer ``w`` (a Python int in the split and fused kernels, else the traced warpgroup index),
        accumulating dK and/or dV of its ``block_kv`` keys. In the split kernel the dV consumer
        publishes each step's P^T and the dK consumer takes it instead of forming S^T itself."""
        plgpu.set_max_registers(_CONSUMER_REGISTERS, action="increase")
        if fuse:
            # A zero the compiler cannot see through, added to the resident tiles' indices every
            # step: otherwise their wgmma descriptors are hoisted out of the loop and spilled
            # (236/268 bytes; none with it: NOTES.md, session 26).
            zero_smem.at[w][...] = plgpu.layout_cast(jnp.zeros((128,), jnp.int32),
                                                     plgpu.Layout.WG_STRIDED((128,), vec_size=1))
        takes_pt = split and dk  # P^T from shared memory; no K, no S^T
        own = 0 if split else w  # which consumer's key block
        k_smem = None if takes_pt else k_smem2.at[own]
        v_smem = v_smem2.at[own] if dk else None
        resident = [tile for tile in (k_smem, v_smem) if tile is not None]
        k0 = cta_k0 + own * block_kv
        rows = (batch, pl.ds(k0, block_kv), kv_head)
        for j, (src, dst) in enumerate(((k_ref, k_smem), (v_ref, v_smem))):
            ready = kv_ready.at[2 * w + j]
            if dst is not None:
                plgpu.copy_gmem_to_smem(src.at[rows], dst, ready)
                plgpu.barrier_wait(ready)
        if fuse:
            # Two dS^T buffers, one step apart (`step`): buffer 0 starts free, and buffer 1 starts
            # published, so step 0's wait for the step before passes (that dQ is never sent).
            plgpu.barrier_arrive(ds_free.at[0])
            plgpu.barrier_arrive(ds_ready.at[1])

        zeros = jnp.zeros((block_kv, statics.head_dim_padded), jnp.float32)
        accs = tuple(plgpu.layout_cast(zeros, plgpu.Layout.WGMMA) for _ in range(dk + dv))
        if fuse:
            rows_w, cols_w = _dq_slab(statics, w)
            accs = (*accs, plgpu.layout_cast(jnp.zeros((rows_w.size,), jnp.float32),
                                             plgpu.Layout.WGMMA.reduce(1)))

            def issue_dq(acc_ref, buffer, zero=0):
                """This consumer's slab of dS K from both consumers' dS^T tiles in ``buffer``."""
                for v in range(consumers):
                    plgpu.wgmma(acc_ref, ds_smem.at[buffer * consumers + v + zero, :, rows_w].transpose((1, 0)),
                                k_smem2.at[v + zero, :, cols_w])

        def step(s, carry, *, t, masked: bool):
            slot = lax.rem(s, stages)
            plgpu.barrier_wait(tile_ready.at[slot])
            shape = (block_kv, block_q)
            zero = zero_smem[w, 0] if fuse else 0
            k_step = None if k_smem is None else k_smem2.at[own + zero]
            v_step = None if v_smem is None else v_smem2.at[own + zero]
            st_smem = (k_step, q_smem.at[slot].transpose((1, 0)), shape)

            load_lse = lambda: plgpu.load(lse_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
            load_delta = lambda: plgpu.load(delta_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))

            def probabilities(st, lse):
                pt = jnp.exp2(st * c - lax.broadcast_in_dim(lse, shape, [1]))
                if masked:
                    # Key k0 + row, query t * block_q + col (padded keys add nothing to any output;
                    # keys past a batch row's length must not: their dK and dV rows come out zero).
                    pt = jnp.where(_visible(shape, row_offset=k0, col_offset=t(s) * block_q, causal=causal,
                                            key_len=kv_len, keys_on_rows=True), pt, 0.0)
                return pt

            dpt_smem = (v_step, do_smem.at[slot].transpose((1, 0)), shape) if dk else None
            if takes_pt:
                # The dV consumer's P^T of this slot, waited for while dP^T is on the tensor cores.
                # Its slot is free again once this consumer has released the ring slot: the dV
                # consumer writes it next for the tile the producer loads after that release.
                delta = load_delta()
                (dpt,) = mma(dpt_smem, then=lambda: plgpu.barrier_wait(pt_ready.at[slot]))
                pt = plgpu.load(pt_smem.at[slot], layout=plgpu.Layout.WGMMA).astype(jnp.float32)
                dpt = dpt - lax.broadcast_in_dim(delta, shape, [1])
            elif dk:
                # S^T and dP^T go to the tensor cores back to back and P^T's exponentials run while
                # dP^T is still in flight (+0.3 to 3.3% fwd+bwd, and no spills in the causal kernel
                # where one wait for both spilled 232 bytes: NOTES.md, session 5); then dV and dK
                # together. lse is loaded while S^T is in flight: the profile had ~11% of the
                # consumers' stall samples on the FFMA waiting for that load after the wait (head
                # dim 128 fwd+bwd +0.2 to +2.1% in two runs at four shapes, head dim 64 unchanged:
                # NOTES.md, session 9). `MosaicConfig.delta_in_acc`: dP^T accumulates onto -delta,
                # loaded before the products.
                pt, dpt = mma_first(statics, st_smem, dpt_smem, then=probabilities, early=load_lse,
                                    second_minus=(load_delta, 1), minus_in_acc=cfg.delta_in_acc)
            else:
                (st,) = mma(st_smem)
                pt = probabilities(st, load_lse())
            if stagger:
                pl.when((wg == 0) & (s == 0))(lambda: plgpu.barrier_arrive(start))
            products = []
            if dk:
                dst = (pt * dpt).astype(dtype)
                products.append((carry[0], dst, q_smem.at[slot]))
            if dv:
                pt16 = pt.astype(dtype)
                if split:
                    pt_smem.at[slot][...] = pt16
                    plgpu.barrier_arrive(pt_ready.at[slot])
                products.append((carry[int(dk)], pt16, do_smem.at[slot]))

            if fuse:
                # dQ one step behind (FlashAttention-2 Algorithm 2's dQ_i += dS_ij K_j): this step
                # issues dK and dV, then the previous step's dQ from both consumers' dS^T tiles,
                # published a step ago, so neither consumer waits for the other's current step;
                # its own dS^T goes into the other buffer while the products run.
                b = lax.rem(s, 2)
                pb = 1 - b
                head_p, tile_p = step_tile(s - 1)

                def issue(refs):
                    *acc_refs, dq_ref = refs
                    for acc_ref, (_, a, b_ref) in zip(acc_refs, products):
                        plgpu.wgmma(acc_ref, a, b_ref)
                    plgpu.barrier_wait(ds_ready.at[pb])
                    issue_dq(dq_ref, pb, zero)
                    plgpu.barrier_wait(ds_free.at[b])
                    ds_smem.at[b * consumers + w][...] = dst
                    plgpu.commit_smem()
                    plgpu.barrier_arrive(ds_ready.at[b])

                zeros_dq = plgpu.layout_cast(jnp.zeros((rows_w.size, cols_w.size), jnp.float32), plgpu.Layout.WGMMA)
                if statics.interpret:
                    # The same waits, stores and arrivals in the same order, with jnp products in
                    # place of the wgmmas (`mma_into`'s interpreter path).
                    f32dot = functools.partial(jnp.dot, preferred_element_type=jnp.float32)
                    dk_new, dv_new = mma_into(statics, *products)
                    plgpu.barrier_wait(ds_ready.at[pb])
                    dq_prev = zeros_dq
                    for v in range(consumers):
                        ds_t = ds_smem[pb * consumers + v]
                        dq_prev = dq_prev + f32dot(ds_t[:, rows_w.start:rows_w.start + rows_w.size].T,
                                                   k_smem2[v][:, cols_w.start:cols_w.start + cols_w.size])
                    plgpu.barrier_wait(ds_free.at[b])
                    ds_smem.at[b * consumers + w][...] = dst
                    plgpu.barrier_arrive(ds_ready.at[b])
                else:
                    dk_new, dv_new, dq_prev = pl.run_state(issue)(
                        (plgpu.ACC.init(carry[0]), plgpu.ACC.init(carry[1]), plgpu.ACC.init(zeros_dq)))
                mult = plgpu.load(mult_smem.at[slot, rows_w], layout=plgpu.Layout.WGMMA.reduce(1))
                plgpu.barrier_arrive(consumed.at[slot])
                plgpu.barrier_arrive(ds_free.at[pb])
                mult_prev = carry[2]
                pl.when(s > 0)(lambda: add_dq(dq_prev, mult_prev, w, head_p, tile_p))
                return (dk_new, dv_new, mult)
            carry = mma_into(statics, *products)
            plgpu.barrier_arrive(consumed.at[slot])
            return carry

        def skip(s):
            slot = lax.rem(s, stages)
            plgpu.barrier_wait(tile_ready.at[slot])
            plgpu.barrier_arrive(consumed.at[slot])

        # A consumer whose keys straddle a batch row's key length masks every step.
        straddles = False if kv_len is None else k0 + block_kv > kv_len

        def group(g, carry):
            # Steps of query head g of the group: s = base + t for query tiles t.
            base = g * tiles - first_tile
            t = lambda s: s - base
            if not causal:
                if kv_len is None:
                    return lax.fori_loop(base, base + num_q_tiles,
                                         functools.partial(step, t=t, masked=False), carry)
                t_full = jnp.where(straddles, num_q_tiles, 0)
                carry = lax.fori_loop(base, base + t_full, functools.partial(step, t=t, masked=True), carry)
                return lax.fori_loop(base + t_full, base + num_q_tiles,
                                     functools.partial(step, t=t, masked=False), carry)
            # Tiles wholly above this key block, tiles across the diagonal, tiles below it. Fused,
            # both consumers take part in every step's dQ product, so nothing is skipped: the
            # masked step gives this consumer's share zeros. Capped at the query tiles there are:
            # with S > T a consumer's keys can start past the last query, and skipping more tiles
            # than the producer loads would wait forever.
            t_active = first_tile if fuse else jnp.clip(k0 // block_q, first_tile, num_q_tiles)
            t_full = jnp.clip(pl.cdiv(k0 + block_kv - 1, block_q), t_active, num_q_tiles)
            t_full = jnp.where(straddles, num_q_tiles, t_full)
            pl.loop(base + first_tile, base + t_active)(skip)
            carry = lax.fori_loop(base + t_active, base + t_full,
                                  functools.partial(step, t=t, masked=True), carry)
            return lax.fori_loop(base + t_full, base + num_q_tiles,
                                 functools.partial(step, t=t, masked=False), carry)

        if stagger:
            # Consumer 1 starts once consumer 0's first S^T and dP^T are done, half a step behind
            # it, so from the first step on one's exponentials overlap the other's products.
            # Consumer 0's first step is step 0 whenever there are steps (causal: its keys start
            # at the CTA's first query tile).
            pl.when((wg == 1) & (steps > 0))(lambda: plgpu.barrier_wait(start))
        accs = lax.fori_loop(0, groups, group, accs)
        if fuse:
            @pl.when(steps > 0)
            def _last_dq():
                # The last step's dQ, then every phase of the dS^T barriers this consumer has not
                # yet waited for: both buffers' release, after which neither consumer's dQ product
                # reads the resident K tiles that dK is about to replace.
                last = steps - 1
                pb = lax.rem(last, 2)
                plgpu.barrier_wait(ds_ready.at[pb])

                def issue_last(acc):
                    issue_dq(acc, pb)
                    return acc[...]

                dq_last = pl.run_scoped(issue_last, plgpu.ACC((rows_w.size, cols_w.size), jnp.float32))
                plgpu.barrier_arrive(ds_free.at[pb])
                add_dq(dq_last, accs[2], w, *step_tile(last))
                plgpu.barrier_wait(ds_free.at[pb])
                plgpu.barrier_wait(ds_free.at[1 - pb])

            @pl.when(steps == 0)
            def _no_steps():
                plgpu.barrier_wait(ds_free.at[0])
                plgpu.barrier_wait(ds_ready.at[1])
        # The resident tiles are dead now and carry the results out, in order (K's tile dK, or
        # dV where K's is the only one; dV's accumulator follows dK's, and the fused kernel's row
        # multipliers follow both). dK also needs the scale's chain rule (S = scale * Q K^T); dV
        # does not.
        results = [accs[0] * statics.scale] * dk + ([accs[int(dk)]] if dv else [])
        for tile, result in zip(resident, results):
            tile[...] = result.astype(dtype)
        plgpu.commit_smem()
        for tile, out_ref in zip(resident, [dk_ref] * dk + [dv_ref] * dv):
            plgpu.copy_smem_to_gmem(tile, out_ref.at[rows])
        plgpu.wait_smem_to_gmem(0)

    if split:
        pl.when(wg == 0)(lambda: consume(0, dk=False, dv=True))
        pl.when(wg == 1)(lambda: consume(1, dk=True, dv=False))
    elif fuse:
        # Per consumer: its slab of the dQ tile (`_dq_slab`) is static.
        for peer in range(consumers):
            pl.when(wg == peer)(functools.partial(consume, peer, dk=True, dv=True))
    else:
        pl.when(wg < consumers)(lambda: consume(wg, dk=True, dv=True))

    @pl.when(wg == consumers)
    def _producer():
        plgpu.set_max_registers(_PRODUCER_REGISTERS, action="decrease")

        def load(s, slot):
            head, t = step_tile(s)
            rows = pl.ds(t * block_q, block_q)
            ready = tile_ready.at[slot]
            plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], q_smem.at[slot], ready)
            plgpu.copy_gmem_to_smem(do_ref.at[batch, rows, head], do_smem.at[slot], ready)
            plgpu.copy_gmem_to_smem(lse_ref.at[batch, head, rows], lse_smem.at[slot], ready)
            plgpu.copy_gmem_to_smem(delta_ref.at[batch, head, rows], delta_smem.at[slot], ready)
            if fuse:
                plgpu.copy_gmem_to_smem(mult_ref.at[batch, head, rows], mult_smem.at[slot], ready)

        produce(steps, stages, [(consumed, load)])


def _dq_kernel(q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, *refs, statics: MosaicStatics, consumers: int):
    refs = list(refs)
    lens_ref = refs.pop(0) if statics.seq_lengths else None
    (dq_ref, q_smem2, do_smem2, lse_smem2, delta_smem2, k_smem, v_smem,
     rows_ready, kv_ready, consumed, start) = refs
    cfg = statics.config
    stagger = cfg.stagger_bwd and consumers == 2
    block_q, block_kv = cfg.block_q_dq, cfg.block_kv_dq
    causal = statics.is_causal
    dtype = q_ref.dtype
    c = statics.scale * LOG2_E
    num_kv_blocks = pl.cdiv(statics.kv_len, block_kv)
    num_q_tiles = statics.q_len_padded // (consumers * block_q)

    batch = lax.axis_index("batch")
    head = lax.axis_index("heads")
    tile = lax.axis_index("q_seq")
    if causal:
        tile = num_q_tiles - 1 - tile  # longest rows first
    wg = lax.axis_index("wg")
    cta_q0 = tile * (consumers * block_q)

    # Keys past kv_len are masked: zero padding, or past the batch row's length. With lengths a CTA
    # whose rows all lie past the query length visits no tile and writes dQ = 0.
    if lens_ref is None:
        kv_len, ragged, live = statics.kv_len, bool(statics.kv_len % block_kv), None
    else:
        kv_len, ragged, live = lens_ref[1, batch], True, cta_q0 < lens_ref[0, batch]

    def steps_for(q0):
        full, visit = kv_steps(q0, block_q=block_q, block_kv=block_kv, kv_len=kv_len, causal=causal)
        if live is None:
            return full, visit
        return jnp.where(live, full, 0), jnp.where(live, visit, 0)

    _, cta_steps = steps_for(cta_q0 + (consumers - 1) * block_q)  # the last consumer's
    stages = min(cfg.num_stages_bwd, num_kv_blocks)

    @pl.when(wg < consumers)
    def _consumer():
        plgpu.set_max_registers(_CONSUMER_REGISTERS, action="increase")
        q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
        q0 = cta_q0 + wg * block_q
        full_steps, steps = steps_for(q0)
        rows = (batch, pl.ds(q0, block_q), head)
        for i, (src, dst) in enumerate(((q_ref.at[rows], q_smem), (do_ref.at[rows], do_smem),
                                        (lse_ref.at[batch, head, pl.ds(q0, block_q)], lse_smem2.at[wg]),
                                        (delta_ref.at[batch, head, pl.ds(q0, block_q)], delta_smem2.at[wg]))):
            plgpu.copy_gmem_to_smem(src, dst, rows_ready.at[4 * wg + i])
        for i in range(4):
            plgpu.barrier_wait(rows_ready.at[4 * wg + i])
        lse = plgpu.load(lse_smem2.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
        delta = plgpu.load(delta_smem2.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
        dq = plgpu.layout_cast(jnp.zeros((block_q, statics.head_dim_padded), jnp.float32),
                               plgpu.Layout.WGMMA)

        def step(i, dq, *, masked: bool):
            slot = lax.rem(i, stages)
            plgpu.barrier_wait(kv_ready.at[slot])
            shape = (block_q, block_kv)

            def probabilities(s):
                p = jnp.exp2(s * c - lax.broadcast_in_dim(lse, shape, [0]))
                if masked:
                    # Key j = i * block_kv + col, query q0 + row: padded keys have k = 0, not P = 0.
                    visible = _visible(shape, row_offset=q0, col_offset=i * block_kv, causal=causal,
                                       key_len=kv_len if ragged else None, keys_on_rows=False)
                    p = jnp.where(visible, p, 0.0)
                return p

            # P's exponentials overlap dP's product, as in the dK/dV kernel.
            p, dp = mma_first(statics, (q_smem, k_smem.at[slot].transpose((1, 0)), shape),
                              (do_smem, v_smem.at[slot].transpose((1, 0)), shape), then=probabilities,
                              second_minus=(lambda: delta, 0), minus_in_acc=cfg.delta_in_acc)
            if stagger:
                pl.when((wg == 0) & (i == 0))(lambda: plgpu.barrier_arrive(start))
            ds = p * dp
            (dq,) = mma_into(statics, (dq, ds.astype(dtype), k_smem.at[slot]))
            plgpu.barrier_arrive(consumed.at[slot])
            return dq

        if stagger:
            # As in the dK/dV kernel; every consumer has at least one step (row q0 sees key 0), or
            # with lengths none of them has (no key, or no row in the CTA).
            waits = wg == 1 if live is None else (wg == 1) & (steps_for(cta_q0)[1] > 0)
            pl.when(waits)(lambda: plgpu.barrier_wait(start))
        dq = lax.fori_loop(0, full_steps, functools.partial(step, masked=False), dq)
        if causal or ragged:
            dq = lax.fori_loop(full_steps, steps, functools.partial(step, masked=True), dq)

        if causal:
            drain(steps, cta_steps, stages, [((kv_ready,), consumed)])

        q_smem[...] = (dq * statics.scale).astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[rows])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == consumers)
    def _producer():
        plgpu.set_max_registers(_PRODUCER_REGISTERS, action="decrease")
        kv_head = lax.div(head, jnp.asarray(statics.groups, head.dtype))

        def load(i, slot):
            rows = (batch, pl.ds(i * block_kv, block_kv), kv_head)
            plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], kv_ready.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], kv_ready.at[slot])

        produce(cta_steps, stages, [(consumed, load)])


def mosaic_backward(q, k, v, out, lse, d_out, lengths=None, *, statics: MosaicStatics):
    """``(dq, dk, dv)`` from the forward's residuals; ``lse`` is the ``[B, N, T]`` base-2
    log-sum-exp that `mosaic_forward` (or the Triton forward) wrote; ``lengths`` as there."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    cfg = statics.config
    lens = (lengths,) if statics.seq_lengths else ()
    if lens:
        # Rows that see no key come with a -inf lse and a zero output; +inf gives them P = 0, so
        # they add nothing to dK and dV and get dQ = 0 whatever their dO.
        lse = jnp.where(jnp.isneginf(lse), jnp.inf, lse)
    # delta = rowsum(dO * O) (FlashAttention-2 section 3.2): an O(T * H) elementwise pass XLA fuses.
    delta = jnp.einsum("btnh,btnh->bnt", out.astype(jnp.float32), d_out.astype(jnp.float32))
    qp, kp, vp = statics.pad_inputs(q, k, v)
    dop = statics.pad_queries(d_out)
    Tp, Sp, Hp = qp.shape[1], kp.shape[1], qp.shape[3]
    # Padded rows: q = dO = 0 and lse = delta = 0, so their P is finite and their dS is zero.
    pad_rows = ((0, 0), (0, 0), (0, Tp - T))
    lse, delta = jnp.pad(lse, pad_rows), jnp.pad(delta, pad_rows)
    transforms = smem_transforms(q.dtype)
    stages = cfg.num_stages_bwd

    def tiles(count, rows):
        return plgpu.SMEM((count, rows, Hp), q.dtype, transforms=transforms)

    def dkv(outputs: str, *dq_operands):
        fuse, split = outputs == "dkdv_dq", outputs == "split"
        consumers = _CONSUMERS
        block_q, block_kv = cfg.block_q_dkv, cfg.block_kv_dkv
        keys_per_cta = block_kv if split else consumers * block_kv
        # Fused: the row multipliers' ring, two buffers of both consumers' dS^T tiles, the staged
        # int32 dQ slabs.
        fused_scratch = [
            plgpu.SMEM((stages, block_q), jnp.float32),
            plgpu.SMEM((2 * consumers, block_kv, block_q), q.dtype, transforms=transforms),
            plgpu.SMEM((consumers, *(s.size for s in _dq_slab(statics, 0))), jnp.int32,
                       transforms=smem_transforms(jnp.int32)),
        ] if fuse else []
        out_type = [jax.ShapeDtypeStruct(kp.shape, k.dtype)] * 2
        if fuse and statics.interpret:
            out_type.append(jax.ShapeDtypeStruct((_kv_ctas(statics), *qp.shape), jnp.int32))
        return launch(
            functools.partial(_dkv_kernel, outputs=outputs), statics=statics,
            out_type=out_type, zero_outputs=fuse,
            scratch=[
                *[tiles(1 if split else consumers, block_kv)] * 2,
                tiles(stages, block_q), tiles(stages, block_q),
                plgpu.SMEM((stages, block_q), jnp.float32),
                plgpu.SMEM((stages, block_q), jnp.float32),
                *fused_scratch,
                # Split: P^T of each ring slot, from the dV consumer to the dK consumer.
                *([plgpu.SMEM((stages, block_kv, block_q), q.dtype, transforms=transforms)] if split else []),
                plgpu.Barrier(num_barriers=2 * consumers),
                # One barrier per ring slot for all of a step's copies (Q, dO, the row vectors),
                # each copy one arrival: one wait per step instead of one per copy (here and in the
                # dQ kernel: fwd+bwd +1 to +4% at 4k and 16k, head dims 64 and 128; NOTES.md,
                # session 6).
                plgpu.Barrier(num_arrivals=4 + fuse, num_barriers=stages),
                *([plgpu.Barrier(num_barriers=stages)] if split else []),
                *([plgpu.Barrier(num_arrivals=consumers, num_barriers=2)] * 2 if fuse else []),  # dS^T ready, free
                plgpu.Barrier(num_arrivals=consumers, num_barriers=stages),
                plgpu.Barrier(),  # consumer 0 to 1: start (`MosaicConfig.stagger_bwd`)
                *([plgpu.SMEM((consumers, 128), jnp.int32)] if fuse else []),  # the opaque zero
            ],
            grid=(K, Sp // keys_per_cta, B), grid_names=("heads", "kv_seq", "batch"),
            consumers=consumers, name=f"pallas_flash_mosaic_{outputs}",
        )(qp, dop, lse, delta, kp, vp, *lens, *dq_operands)

    # Up to head dim 128 each consumer keeps dK and dV (two 64 x H float32 accumulators) in
    # registers; wider, the dK/dV kernel's consumers split one block's work between them (module
    # docstring). At head dim 128 splitting (the dQ kernel's work too) measured 0.71x and 0.75x the
    # fwd+bwd rate, non-causal and causal (NOTES.md, session 10).
    wide = splits_backward(statics.head_dim)
    if not wide and cfg.fuse_dq:
        # Integer adds are associative, so the TMA reduce-adds of the CTAs' partial dQ tiles give
        # the same bits in any order: deterministic, unlike FlashAttention-3's float32 atomics.
        multipliers, finite = _row_multipliers(k, v, d_out, delta[..., :T], statics.groups)
        multipliers_p = jnp.pad(multipliers, pad_rows, constant_values=1.0)
        if statics.interpret:
            # The interpreter has no TMA reductions: each K/V CTA writes its own slice of a
            # zero-filled output instead, summed here (int32 addition, as the TMA's).
            dk, dv, word = dkv("dkdv_dq", multipliers_p)
            word = jnp.sum(word, axis=0, dtype=jnp.int32)
        else:
            word = jax.new_ref(jnp.zeros(qp.shape, jnp.int32))
            dk, dv = dkv("dkdv_dq", multipliers_p, word)
            word = word[...]
        dq = _fixed_point_dq(word, multipliers, finite, statics=statics, shape=q.shape)
        return dq.astype(q.dtype), dk[:, :S, :, :H], dv[:, :S, :, :H]
    dk, dv = dkv("split" if wide else "dkdv")

    consumers = 1 if wide else 2
    dq_stages = min(stages, -(-S // cfg.block_kv_dq))
    dq = launch(
        functools.partial(_dq_kernel, consumers=consumers), statics=statics,
        out_type=jax.ShapeDtypeStruct(qp.shape, q.dtype),
        scratch=[
            tiles(consumers, cfg.block_q_dq), tiles(consumers, cfg.block_q_dq),
            plgpu.SMEM((consumers, cfg.block_q_dq), jnp.float32),
            plgpu.SMEM((consumers, cfg.block_q_dq), jnp.float32),
            tiles(dq_stages, cfg.block_kv_dq), tiles(dq_stages, cfg.block_kv_dq),
            plgpu.Barrier(num_barriers=4 * consumers),
            plgpu.Barrier(num_arrivals=2, num_barriers=dq_stages),  # K and V of a slot: one wait
            plgpu.Barrier(num_arrivals=consumers, num_barriers=dq_stages),
            plgpu.Barrier(),  # consumer 0 to 1: start (`MosaicConfig.stagger_bwd`)
        ],
        grid=(N, Tp // (consumers * cfg.block_q_dq), B), grid_names=("heads", "q_seq", "batch"),
        consumers=consumers, name="pallas_flash_mosaic_dq",
    )(qp, dop, lse, delta, kp, vp, *lens)
    return dq[:, :T, :, :H], dk[:, :S, :, :H], dv[:, :S, :, :H]
