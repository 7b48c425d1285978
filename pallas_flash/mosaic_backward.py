"""FlashAttention backward for Hopper (Pallas, Mosaic GPU backend), on the forward's machinery.

FlashAttention-2 (Dao 2023), Algorithm 2, as two warp-specialised kernels with no atomics, so the
gradients are bitwise deterministic:

* dK/dV: each of two consumer warpgroups keeps ``block_kv_dkv`` rows of K and V resident in shared
  memory and float32 dK/dV accumulators in registers; a producer warpgroup streams Q, dO, the
  base-2 log-sum-exp and delta tiles of *every query head of the K/V head* through a TMA ring, so
  grouped-query heads are summed inside the CTA instead of by a repeat-then-sum in HBM.
* dQ: each consumer keeps ``block_q_dq`` rows of Q and dO and a float32 dQ accumulator; the
  producer streams K/V tiles, as in the forward.

All four products per tile run on ``wgmma``: ``S^T = K Q^T`` and ``dP^T = V dO^T`` from shared
memory, ``dV += P^T dO`` and ``dK += dS^T Q`` with P and dS straight from registers.

Head dims above 128: two 64 x 256 float32 accumulators would need 256 registers per thread, so dV
and dK take one pass each (the dV pass recomputes S, the dK pass S and dP: five products per tile
pair instead of four), and the dK and dQ passes, which keep two 64 x 256 tiles resident next to a
two-slot ring, run one consumer warpgroup per CTA to fit shared memory.

Causal masking skips every tile that lies wholly above the diagonal and masks only those that
straddle it. The two consumers of a CTA own different rows, so one may skip steps that the other
computes: it still waits for each tile and releases it, which keeps every barrier's phases in step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_flash.config import MosaicStatics
from pallas_flash.mosaic_forward import (LOG2_E, _CONSUMER_REGISTERS, _PRODUCER_REGISTERS, kv_steps, launch,
                                         mma, mma_into, produce, smem_transforms)


def _ready_all(barriers, slot):
    for b in barriers:
        plgpu.barrier_wait(b.at[slot])


def _dkv_kernel(q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, *refs, statics: MosaicStatics,
                consumers: int, outputs: str):
    """``outputs``: "dkdv" (both, one pass), "dv" or "dk" (one pass each, for wide heads)."""
    want_dk, want_dv = outputs in ("dkdv", "dk"), outputs in ("dkdv", "dv")
    refs = list(refs)
    dk_ref = refs.pop(0) if want_dk else None
    dv_ref = refs.pop(0) if want_dv else None
    k_smem2 = refs.pop(0)
    v_smem2 = refs.pop(0) if want_dk else None  # V only enters through dP, which only dK needs
    q_smem, do_smem, lse_smem, delta_smem, kv_ready, q_ready, do_ready, lse_ready, delta_ready, consumed = refs
    cfg = statics.config
    block_q, block_kv = cfg.block_q_dkv, cfg.block_kv_dkv
    causal, groups = statics.is_causal, statics.groups
    dtype = q_ref.dtype
    c = statics.scale * LOG2_E
    num_q_tiles = pl.cdiv(statics.q_len, block_q)  # tiles of pure padding add nothing

    batch = lax.axis_index("batch")
    kv_head = lax.axis_index("heads")
    wg = lax.axis_index("wg")
    cta_k0 = lax.axis_index("kv_seq") * (consumers * block_kv)
    # Causal: query row i sees key j only if j <= i, so rows above this CTA's first key are skipped.
    first_tile = cta_k0 // block_q if causal else 0
    tiles = num_q_tiles - first_tile
    steps = groups * tiles
    stages = cfg.num_stages_bwd
    ring = (q_ready, do_ready, lse_ready) + ((delta_ready,) if want_dk else ())

    def step_tile(s):
        g = lax.div(s, tiles)
        return kv_head * groups + g, first_tile + s - g * tiles

    @pl.when(wg < consumers)
    def _consumer():
        plgpu.set_max_registers(_CONSUMER_REGISTERS, action="increase")
        k_smem = k_smem2.at[wg]
        v_smem = v_smem2.at[wg] if want_dk else None
        k0 = cta_k0 + wg * block_kv
        rows = (batch, pl.ds(k0, block_kv), kv_head)
        plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem, kv_ready.at[2 * wg])
        plgpu.barrier_wait(kv_ready.at[2 * wg])
        if want_dk:
            plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem, kv_ready.at[2 * wg + 1])
            plgpu.barrier_wait(kv_ready.at[2 * wg + 1])

        zeros = jnp.zeros((block_kv, statics.head_dim_padded), jnp.float32)
        accs = tuple(plgpu.layout_cast(zeros, plgpu.Layout.WGMMA) for _ in range(want_dk + want_dv))

        def step(s, carry, *, t, masked: bool):
            slot = lax.rem(s, stages)
            _ready_all(ring, slot)
            # Two waits per tile, not four: S^T and dP^T go to the tensor cores back to back,
            # then dV and dK.
            shape = (block_kv, block_q)
            st_smem = (k_smem, q_smem.at[slot].transpose((1, 0)), shape)
            if want_dk:
                st, dpt = mma(st_smem, (v_smem, do_smem.at[slot].transpose((1, 0)), shape))
            else:
                (st,) = mma(st_smem)
            lse = plgpu.load(lse_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
            pt = jnp.exp2(st * c - lax.broadcast_in_dim(lse, shape, [1]))
            if masked:
                keys = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA) + k0
                queries = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
                pt = jnp.where(keys <= queries + t(s) * block_q, pt, 0.0)
            products = []
            if want_dk:
                delta = plgpu.load(delta_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
                dst = pt * (dpt - lax.broadcast_in_dim(delta, shape, [1]))
                products.append((carry[0], dst.astype(dtype), q_smem.at[slot]))
            if want_dv:
                products.append((carry[-1], pt.astype(dtype), do_smem.at[slot]))
            carry = mma_into(statics, *products)
            plgpu.barrier_arrive(consumed.at[slot])
            return carry

        def skip(s):
            slot = lax.rem(s, stages)
            _ready_all(ring, slot)
            plgpu.barrier_arrive(consumed.at[slot])

        def group(g, carry):
            # Steps of query head g of the group: s = base + t for query tiles t.
            base = g * tiles - first_tile
            t = lambda s: s - base
            if not causal:
                return lax.fori_loop(base, base + num_q_tiles,
                                     functools.partial(step, t=t, masked=False), carry)
            # Tiles wholly above this key block, tiles across the diagonal, tiles below it.
            t_active = jnp.maximum(k0 // block_q, first_tile)
            t_full = jnp.clip(pl.cdiv(k0 + block_kv - 1, block_q), t_active, num_q_tiles)
            pl.loop(base + first_tile, base + t_active)(skip)
            carry = lax.fori_loop(base + t_active, base + t_full,
                                  functools.partial(step, t=t, masked=True), carry)
            return lax.fori_loop(base + t_full, base + num_q_tiles,
                                 functools.partial(step, t=t, masked=False), carry)

        accs = lax.fori_loop(0, groups, group, accs)
        # K (and V) are dead now: their tiles carry the results out. dK also needs the scale's
        # chain rule (S = scale * Q K^T); dV does not.
        if want_dk:
            k_smem[...] = (accs[0] * statics.scale).astype(dtype)
        out_smem = v_smem if want_dk else k_smem
        if want_dv:
            out_smem[...] = accs[-1].astype(dtype)
        plgpu.commit_smem()
        if want_dk:
            plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[rows])
        if want_dv:
            plgpu.copy_smem_to_gmem(out_smem, dv_ref.at[rows])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == consumers)
    def _producer():
        plgpu.set_max_registers(_PRODUCER_REGISTERS, action="decrease")

        def load(s, slot):
            head, t = step_tile(s)
            rows = pl.ds(t * block_q, block_q)
            plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], q_smem.at[slot], q_ready.at[slot])
            plgpu.copy_gmem_to_smem(do_ref.at[batch, rows, head], do_smem.at[slot], do_ready.at[slot])
            plgpu.copy_gmem_to_smem(lse_ref.at[batch, head, rows], lse_smem.at[slot], lse_ready.at[slot])
            if want_dk:
                plgpu.copy_gmem_to_smem(delta_ref.at[batch, head, rows], delta_smem.at[slot],
                                        delta_ready.at[slot])

        produce(steps, stages, [(consumed, load)])


def _dq_kernel(q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, dq_ref,
               q_smem2, do_smem2, lse_smem2, delta_smem2, k_smem, v_smem,
               rows_ready, k_ready, v_ready, consumed, *, statics: MosaicStatics, consumers: int):
    cfg = statics.config
    block_q, block_kv = cfg.block_q_dq, cfg.block_kv_dq
    causal, kv_len = statics.is_causal, statics.kv_len
    dtype = q_ref.dtype
    c = statics.scale * LOG2_E
    num_kv_blocks = pl.cdiv(kv_len, block_kv)
    num_q_tiles = statics.q_len_padded // (consumers * block_q)

    batch = lax.axis_index("batch")
    head = lax.axis_index("heads")
    tile = lax.axis_index("q_seq")
    if causal:
        tile = num_q_tiles - 1 - tile  # longest rows first
    wg = lax.axis_index("wg")
    cta_q0 = tile * (consumers * block_q)

    steps_for = functools.partial(kv_steps, block_q=block_q, block_kv=block_kv, kv_len=kv_len, causal=causal)
    _, cta_steps = steps_for(cta_q0 + block_q)
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
            plgpu.barrier_wait(k_ready.at[slot])
            plgpu.barrier_wait(v_ready.at[slot])
            shape = (block_q, block_kv)
            s, dp = mma((q_smem, k_smem.at[slot].transpose((1, 0)), shape),
                        (do_smem, v_smem.at[slot].transpose((1, 0)), shape))
            p = jnp.exp2(s * c - lax.broadcast_in_dim(lse, shape, [0]))
            if masked:
                qi = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA) + q0
                kj = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA) + i * block_kv
                visible = kj < kv_len  # padded keys have k = 0, not P = 0
                if causal:
                    visible = visible & (kj <= qi)
                p = jnp.where(visible, p, 0.0)
            ds = p * (dp - lax.broadcast_in_dim(delta, shape, [0]))
            (dq,) = mma_into(statics, (dq, ds.astype(dtype), k_smem.at[slot]))
            plgpu.barrier_arrive(consumed.at[slot])
            return dq

        dq = lax.fori_loop(0, full_steps, functools.partial(step, masked=False), dq)
        if causal or kv_len % block_kv:
            dq = lax.fori_loop(full_steps, steps, functools.partial(step, masked=True), dq)

        if causal:
            @pl.loop(steps, cta_steps)
            def _drain(i):
                slot = lax.rem(i, stages)
                plgpu.barrier_wait(k_ready.at[slot])
                plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_arrive(consumed.at[slot])

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
            plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_ready.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_ready.at[slot])

        produce(cta_steps, stages, [(consumed, load)])


def mosaic_backward(q, k, v, out, lse, d_out, *, statics: MosaicStatics):
    """``(dq, dk, dv)`` from the forward's residuals; ``lse`` is the ``[B, N, T]`` base-2
    log-sum-exp that `mosaic_forward` (or the Triton forward) wrote."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    cfg = statics.config
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

    def dkv(outputs: str, consumers: int):
        return launch(
            functools.partial(_dkv_kernel, consumers=consumers, outputs=outputs), statics=statics,
            out_type=[jax.ShapeDtypeStruct(kp.shape, k.dtype)] * (2 if outputs == "dkdv" else 1),
            scratch=[
                *[tiles(consumers, cfg.block_kv_dkv)] * (1 if outputs == "dv" else 2),
                tiles(stages, cfg.block_q_dkv), tiles(stages, cfg.block_q_dkv),
                plgpu.SMEM((stages, cfg.block_q_dkv), jnp.float32),
                plgpu.SMEM((stages, cfg.block_q_dkv), jnp.float32),
                plgpu.Barrier(num_barriers=2 * consumers),
                *[plgpu.Barrier(num_barriers=stages)] * 4,
                plgpu.Barrier(num_arrivals=consumers, num_barriers=stages),
            ],
            grid=(K, Sp // (consumers * cfg.block_kv_dkv), B), grid_names=("heads", "kv_seq", "batch"),
            consumers=consumers, name=f"pallas_flash_mosaic_{outputs}",
        )(qp, dop, lse, delta, kp, vp)

    # Up to head dim 128 one pass keeps dK and dV (two 64 x H float32 accumulators) in registers;
    # at 256 those would be 256 registers per thread, so dV and dK take a pass each, and the dK
    # and dQ passes (two resident 64 x 256 tiles plus the ring) run one consumer per CTA to fit
    # shared memory.
    wide = statics.head_dim_padded > 128
    if wide:
        (dv,), (dk,) = dkv("dv", 2), dkv("dk", 1)
    else:
        dk, dv = dkv("dkdv", 2)

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
            plgpu.Barrier(num_barriers=dq_stages),
            plgpu.Barrier(num_barriers=dq_stages),
            plgpu.Barrier(num_arrivals=consumers, num_barriers=dq_stages),
        ],
        grid=(N, Tp // (consumers * cfg.block_q_dq), B), grid_names=("heads", "q_seq", "batch"),
        consumers=consumers, name="pallas_flash_mosaic_dq",
    )(qp, dop, lse, delta, kp, vp)
    return dq[:, :T, :, :H], dk[:, :S, :, :H], dv[:, :S, :, :H]
