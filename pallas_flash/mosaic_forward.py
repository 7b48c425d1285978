"""FlashAttention-3 style forward kernel for Hopper (Pallas, Mosaic GPU backend).

FlashAttention-3 (Shah et al. 2024), section 3.1: one CTA owns ``2 * block_q`` query rows of one
(batch, head) and runs three warpgroups. The *producer* warpgroup gives most of its registers away
(``setmaxnreg``) and only issues TMA copies of K/V tiles into a ``num_stages`` deep shared-memory
ring; each copy completes on an mbarrier, and the slot is refilled once both consumers have arrived
on its "consumed" barrier. The two *consumer* warpgroups own ``block_q`` rows each and run
``wgmma`` for ``Q K^T`` (both operands in shared memory) and ``P V`` (P straight from registers, never
through shared memory).

Ping-pong scheduling (section 3.1, "inter-warpgroup overlapping"): a two-arrival "schedule" barrier
hands the tensor cores back and forth, so one consumer's softmax (exp2 on the SFU, row max and sum)
runs while the other's matmuls occupy the tensor cores. Consumer 1 starts half a turn late and
consumer 0 finishes half a turn late, so their barrier counts match.

Causal masking skips whole K/V tiles past the diagonal; only the tiles that straddle it (and the
last tile when the key length is not a tile multiple) pay for an iota mask. With causal masking
the two consumers of a CTA need different numbers of tiles: the one that finishes early keeps
arriving on the consumed and schedule barriers until its partner is done, so neither the producer
nor the ping-pong ever waits on a warpgroup that has left.

The softmax is in base 2 with ``scale * log2(e)`` folded into one multiply, and the kernel writes
the base-2 log-sum-exp in the same ``[B, N, T]`` layout as the Triton forward, so either backward
can consume it.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_flash.config import MosaicConfig, MosaicStatics

LOG2_E = math.log2(math.e)
_COMPUTE_WGS = 2
# The producer only issues TMA: 24 registers would do, 40 is the smallest step that leaves the
# consumers their 232 (setmaxnreg works in multiples of 8 and the CTA total must fit 64K).
_PRODUCER_REGISTERS = 40
_CONSUMER_REGISTERS = 232


def smem_transforms(dtype):
    """128-byte swizzled (8, 64)-element tiles: the layout wgmma reads without bank conflicts."""
    swizzle_elems = 128 // jnp.dtype(dtype).itemsize
    return (plgpu.TilingTransform((8, swizzle_elems)), plgpu.SwizzleTransform(128))


def compiler_params():
    # approx_math: exp2 and the reciprocal lower to the SFU's approximate instructions, as FA3 does.
    return plgpu.CompilerParams(approx_math=True)


def interpret_params(statics: MosaicStatics):
    return plgpu.InterpretGPUParams(detect_races=statics.detect_races) if statics.interpret else None


def launch(body, *, statics: MosaicStatics, out_type, scratch, grid, grid_names, consumers: int, name: str):
    """`plgpu.kernel` with ``consumers`` compute warpgroups plus one producer warpgroup ("wg")."""
    return plgpu.kernel(
        functools.partial(body, statics=statics),
        out_type=out_type,
        scratch_types=scratch,
        grid=grid,
        grid_names=grid_names,
        num_threads=consumers + 1,
        thread_name="wg",
        compiler_params=compiler_params(),
        interpret=interpret_params(statics),
        kernel_name=name,
    )


def mma_into(statics: MosaicStatics, *products, then=None):
    """``acc + a @ b`` for each ``(acc, a, b_ref)`` with ``a`` in registers (P, dS) and ``b`` in shared
    memory, all issued before one wait; ``then()`` runs while they are in flight. Returns a tuple.

    On the GPU the wgmmas accumulate in place (`pl.run_state` over `plgpu.ACC.init`), as FA3 does,
    so P never goes through shared memory. The Mosaic GPU interpreter of jax 0.11.2 takes wgmma
    operands from shared memory only and has no rule for accumulators inside `pl.run_state`, so in
    interpret mode each product is a float32-accumulated `jnp.dot` of the same operands.
    """
    if statics.interpret:
        out = tuple(acc + jnp.dot(a, b_ref[...], preferred_element_type=jnp.float32)
                    for acc, a, b_ref in products)
        if then is not None:
            then()
        return out

    def issue(acc_refs):
        for acc_ref, (_, a, b_ref) in zip(acc_refs, products):
            plgpu.wgmma(acc_ref, a, b_ref)
        if then is not None:
            then()

    return tuple(pl.run_state(issue)(tuple(plgpu.ACC.init(acc) for acc, _, _ in products)))


def mma(*products, then=None):
    """``a @ b`` into fresh float32 accumulators for each ``(a_ref, b_ref, shape)``, both operands
    in shared memory, all issued before one wait. Returns a tuple."""
    def issue(*acc_refs):
        for acc_ref, (a_ref, b_ref, _) in zip(acc_refs, products):
            plgpu.wgmma(acc_ref, a_ref, b_ref)
        if then is not None:
            then()
        return tuple(acc_ref[...] for acc_ref in acc_refs)

    return pl.run_scoped(issue, *(plgpu.ACC(shape, jnp.float32) for _, _, shape in products))


def _schedule_sync(barrier):
    plgpu.barrier_arrive(barrier)
    plgpu.barrier_wait(barrier)


def _forward_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, qo_smem2, k_smem, v_smem, lse_smem2,
                    k_ready, v_ready, q_ready, k_consumed, v_consumed, schedule, *,
                    statics: MosaicStatics):
    cfg: MosaicConfig = statics.config
    block_q, block_kv, stages = cfg.block_q, cfg.block_kv, statics.forward_stages
    causal = statics.is_causal
    kv_len = statics.kv_len  # true key length; keys past it are zero padding and masked
    num_kv_blocks = pl.cdiv(kv_len, block_kv)  # tiles of pure padding are never visited
    num_q_tiles = statics.q_len_padded // (_COMPUTE_WGS * block_q)
    dtype = q_ref.dtype
    c = statics.scale * LOG2_E

    batch = lax.axis_index("batch")
    head = lax.axis_index("heads")
    tile = lax.axis_index("q_seq")
    if causal:
        # Causal rows grow with the tile index: launching the longest first trims the last wave.
        tile = num_q_tiles - 1 - tile
    wg = lax.axis_index("wg")
    cta_q0 = tile * (_COMPUTE_WGS * block_q)

    def kv_steps(q0):
        """(tiles with no masked logit, tiles to visit) for query rows [q0, q0 + block_q)."""
        full = kv_len // block_kv
        if not causal:
            return full, num_kv_blocks
        full = jnp.minimum((q0 + 1) // block_kv, full)
        return full, jnp.minimum(pl.cdiv(q0 + block_q, block_kv), num_kv_blocks)

    _, cta_steps = kv_steps(cta_q0 + block_q)  # the later consumer sees the most tiles

    @pl.when(wg < _COMPUTE_WGS)
    def _consumer():
        plgpu.set_max_registers(_CONSUMER_REGISTERS, action="increase")
        qo_smem, lse_smem = qo_smem2.at[wg], lse_smem2.at[wg]
        q0 = cta_q0 + wg * block_q
        full_steps, steps = kv_steps(q0)
        plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(q0, block_q), head], qo_smem, q_ready.at[wg])
        plgpu.barrier_wait(q_ready.at[wg])

        m = plgpu.layout_cast(jnp.full((block_q,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        l = plgpu.layout_cast(jnp.zeros((block_q,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        acc = plgpu.layout_cast(jnp.zeros((block_q, statics.head_dim_padded), jnp.float32),
                                plgpu.Layout.WGMMA)

        plgpu.barrier_wait(k_ready.at[0])
        pl.when(wg == 1)(lambda: _schedule_sync(schedule))

        def step(i, carry, *, masked: bool):
            acc, m, l = carry
            slot = lax.rem(i, stages)

            # Hands the tensor cores over while this wgmma is still in flight.
            (s,) = mma((qo_smem, k_smem.at[slot].transpose((1, 0)), (block_q, block_kv)),
                       then=lambda: _schedule_sync(schedule))
            plgpu.barrier_arrive(k_consumed.at[slot])
            if masked:
                rows = plgpu.broadcasted_iota(jnp.int32, (block_q, block_kv), 0, layout=plgpu.Layout.WGMMA)
                cols = plgpu.broadcasted_iota(jnp.int32, (block_q, block_kv), 1, layout=plgpu.Layout.WGMMA)
                cols = cols + i * block_kv
                visible = cols < kv_len
                if causal:
                    visible = visible & (cols <= rows + q0)
                s = jnp.where(visible, s, -jnp.inf)
            # Every row sees key 0 in the first tile it visits, so m is finite from then on and
            # exp2(-inf - m) is a clean 0 for the masked logits.
            m_new = jnp.maximum(m, s.max(axis=1) * c)
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s * c - lax.broadcast_in_dim(m_new, s.shape, [0]))
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            l = l * alpha
            p16 = p.astype(dtype)
            # The row sum is issued before handing the tensor cores back for narrow heads (its FADDs
            # then overlap the partner's wgmma); for 256-wide heads the accumulator rescale already
            # fills that gap and the registers are tighter.
            if statics.head_dim_padded <= 128:
                l = l + p.sum(axis=1)
                acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
            plgpu.barrier_arrive(schedule)
            plgpu.barrier_wait(v_ready.at[slot])
            plgpu.barrier_wait(schedule)
            if statics.head_dim_padded > 128:
                l = l + p.sum(axis=1)

            def wait_next_k():
                @pl.when(i + 1 < steps)
                def _():
                    plgpu.barrier_wait(k_ready.at[lax.rem(i + 1, stages)])

            (acc,) = mma_into(statics, (acc, p16, v_smem.at[slot]), then=wait_next_k)
            plgpu.barrier_arrive(v_consumed.at[slot])
            return acc, m_new, l

        carry = (acc, m, l)
        carry = lax.fori_loop(0, full_steps, functools.partial(step, masked=False), carry)
        if causal or kv_len % block_kv:  # a straddling diagonal or a ragged last tile
            carry = lax.fori_loop(full_steps, steps, functools.partial(step, masked=True), carry)
        acc, m, l = carry

        if causal:
            @pl.loop(steps, cta_steps)
            def _drain(i):
                # Keeps the producer's and the partner's barrier counts in step (module docstring).
                # Waiting for each tile before releasing it keeps this warpgroup from arriving
                # twice on one slot's barrier before its partner has arrived once.
                slot = lax.rem(i, stages)
                plgpu.barrier_wait(k_ready.at[slot])
                plgpu.barrier_arrive(k_consumed.at[slot])
                plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_arrive(v_consumed.at[slot])
                _schedule_sync(schedule)
                _schedule_sync(schedule)

        pl.when(wg == 0)(lambda: _schedule_sync(schedule))

        inv_l = 1.0 / l  # one reciprocal per row instead of a divide per element
        qo_smem[...] = (acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])).astype(dtype)
        lse_smem[...] = m + jnp.log2(l)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(qo_smem, o_ref.at[batch, pl.ds(q0, block_q), head])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[batch, head, pl.ds(q0, block_q)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _COMPUTE_WGS)
    def _producer():
        plgpu.set_max_registers(_PRODUCER_REGISTERS, action="decrease")
        kv_head = lax.div(head, jnp.asarray(statics.groups, head.dtype))

        def load(i, slot):
            rows = (batch, pl.ds(i * block_kv, block_kv), kv_head)
            plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_ready.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_ready.at[slot])

        for i in range(stages):
            pl.when(i < cta_steps)(functools.partial(load, i, i))

        @pl.loop(stages, cta_steps)
        def _refill(i):
            slot = lax.rem(i, stages)
            rows = (batch, pl.ds(i * block_kv, block_kv), kv_head)
            plgpu.barrier_wait(k_consumed.at[slot])
            plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_ready.at[slot])
            plgpu.barrier_wait(v_consumed.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_ready.at[slot])

        @pl.loop(jnp.maximum(cta_steps - stages, 0), cta_steps)
        def _last(i):
            # Observes the last releases too: idle time for the producer, and every barrier phase
            # then has been waited on by each warpgroup that uses it (the interpreter checks this).
            slot = lax.rem(i, stages)
            plgpu.barrier_wait(k_consumed.at[slot])
            plgpu.barrier_wait(v_consumed.at[slot])


def mosaic_forward(q, k, v, *, statics: MosaicStatics):
    """Returns ``(out [B, T, N, H], lse2 [B, N, T] float32)`` like `forward.flash_forward`.

    Inputs arrive padded (`MosaicStatics.pad_inputs`): T to a multiple of ``2 * block_q``, S to a
    multiple of ``block_kv``, H to a multiple of 64; the outputs are sliced back here.
    """
    B, T, N, H = q.shape
    q, k, v = statics.pad_inputs(q, k, v)
    cfg = statics.config
    Tp, Hp = q.shape[1], q.shape[3]
    stages = statics.forward_stages
    transforms = smem_transforms(q.dtype)
    scratch = [
        plgpu.SMEM((_COMPUTE_WGS, cfg.block_q, Hp), q.dtype, transforms=transforms),
        plgpu.SMEM((stages, cfg.block_kv, Hp), q.dtype, transforms=transforms),
        plgpu.SMEM((stages, cfg.block_kv, Hp), q.dtype, transforms=transforms),
        plgpu.SMEM((_COMPUTE_WGS, cfg.block_q), jnp.float32),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=_COMPUTE_WGS),
        plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),
        plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),
        plgpu.Barrier(num_arrivals=_COMPUTE_WGS),
    ]
    out, lse = launch(
        _forward_kernel, statics=statics,
        out_type=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, N, Tp), jnp.float32)],
        scratch=scratch, grid=(N, Tp // (_COMPUTE_WGS * cfg.block_q), B),
        grid_names=("heads", "q_seq", "batch"), consumers=_COMPUTE_WGS, name="pallas_flash_mosaic_forward",
    )(q, k, v)
    return out[:, :T, :, :H], lse[:, :, :T]
