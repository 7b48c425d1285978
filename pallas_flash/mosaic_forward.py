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

With ``MosaicConfig.overlap_softmax`` (section 3.2, "intra-warpgroup overlapping") each consumer
issues ``Q K_i^T`` together with ``P_{i-1} V_{i-1}`` in one turn and runs the softmax of tile i
while ``P_{i-1} V_{i-1}`` is still on the tensor cores; turns then pass on two one-arrival barriers,
one per consumer, instead of the rendezvous, so neither waits for the other's softmax to end.

``MosaicConfig.stale_max`` (with the overlapped schedule) drops the per-tile row max, which with the
rescale it saves is about a tenth of the forward's time: each tile's P is taken relative to the
running max of the earlier tiles, and a warp moves that max up, from P, only when one of its rows
sums past `STALE_ROW_SUM_LIMIT` (`stale_softmax`). Rows whose P overflowed (logits 2^128 past the
max) come out NaN; a second, short launch of the same kernel (``fixup``) recomputes the CTA tiles
with a non-finite lse with the exact softmax, writing into the first launch's outputs.

``MosaicConfig.forward_consumers = 3`` (with the overlapped schedule) runs three 64-row consumers
per CTA, FA3's choice for head dim 64: its products are short next to the softmax, so while one
consumer's products run, two consumers' softmaxes can overlap them; turns go round in order. They
get 160 registers each. A padded length that does not fill the last CTA leaves consumers idle there,
passing the ring and the turns on.

Causal masking skips whole K/V tiles past the diagonal; only the tiles that straddle it (and the
last tile when the key length is not a tile multiple) pay for an iota mask. Non-causal, the
overlapped schedule instead starts with a short tile of the remainder (`short_first_tile`), so
FlashAttention-3's 176-key tiles need no mask at 4096 keys. With causal masking
the consumers of a CTA need different numbers of tiles: one that finishes early keeps arriving
on the consumed and schedule barriers until the last is done, so neither the producer nor the
turns ever wait on a warpgroup that has left.

Per-row sequence lengths (`MosaicStatics.seq_lengths`) are read in the kernel: tiles past a row's
key length are never loaded and the last one it visits is masked; under the overlapped schedule a
consumer whose rows all lie past the query length idles as one past the padded length does, and
rows that see no key are written as zeros with a -inf log-sum-exp.

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
import jax.experimental.mosaic.gpu as mgpu
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, nvvm, vector

from pallas_flash.config import MosaicConfig, MosaicStatics, v_granule

LOG2_E = math.log2(math.e)
# The producer only issues TMA, so it gets setmaxnreg's minimum, 24, and the consumers what that
# frees: a 384-thread CTA launches with 168 registers per thread, and (24 + 2 * 240) * 128 fits the
# same 64K. FA3 splits them so too; over 40/232, fwd+bwd measured +0 to +3% on six shapes, the
# forward -1 to +3% (NOTES.md, session 5).
_PRODUCER_REGISTERS = 24
_CONSUMER_REGISTERS = 240
# With three consumers a 512-thread CTA launches with 128 registers per thread: 24 + 3 * 160 <= 4 * 128.
_CONSUMER_REGISTERS_BY_COUNT = {2: _CONSUMER_REGISTERS, 3: 160}


def smem_transforms(dtype, swizzle: int = 128):
    """Swizzled (8, swizzle-bytes)-wide tiles, by default 128 bytes ((8, 64) bf16 elements): the
    layout wgmma reads without bank conflicts."""
    swizzle_elems = swizzle // jnp.dtype(dtype).itemsize
    return (plgpu.TilingTransform((8, swizzle_elems)), plgpu.SwizzleTransform(swizzle))


def v_transforms(dtype, rows: int):
    """V's tiles, in the swizzle `config.v_granule` picks for ``rows`` keys."""
    return smem_transforms(dtype, v_granule(rows) * jnp.dtype(dtype).itemsize)


def compiler_params():
    # approx_math: exp2 and the reciprocal lower to the SFU's approximate instructions, as FA3 does.
    return plgpu.CompilerParams(approx_math=True)


def interpret_params(statics: MosaicStatics, *, zero_outputs: bool = False):
    if not statics.interpret:
        return None
    # Outputs start as NaN (or the integer maximum) unless asked, so an element a kernel forgets
    # to write shows up in the tests.
    return plgpu.InterpretGPUParams(detect_races=statics.detect_races,
                                    uninitialized_memory="zero" if zero_outputs else "nan")


def launch(body, *, statics: MosaicStatics, out_type, scratch, grid, grid_names, consumers: int, name: str,
           zero_outputs: bool = False):
    """`plgpu.kernel` with ``consumers`` compute warpgroups plus one producer warpgroup ("wg");
    ``zero_outputs`` zero-fills the outputs in interpret mode (a GPU leaves them undefined)."""
    return plgpu.kernel(
        functools.partial(body, statics=statics),
        out_type=out_type,
        scratch_types=scratch,
        grid=grid,
        grid_names=grid_names,
        num_threads=consumers + 1,
        thread_name="wg",
        compiler_params=compiler_params(),
        interpret=interpret_params(statics, zero_outputs=zero_outputs),
        kernel_name=name,
    )


# `MosaicConfig.stale_max`: a tile's P, taken relative to the running max of earlier tiles, keeps that
# max while every row sums to at most this (so no P exceeds it: bf16 and float32 hold such P exactly
# as well as P <= 1).
STALE_ROW_SUM_LIMIT = 2.0 ** 8


def warp_any(flags, *, interpret: bool):
    """int32 1 if any row of ``flags`` (an int32 row vector in the WGMMA layout, 0 or 1) held by this
    thread's warp is set, else 0: a warp-uniform branch condition, since each warp owns 16 whole
    rows of the layout. A per-warp vote (`vote.sync.any`) needs no shared memory, unlike a reduction
    over the whole warpgroup. The interpreter runs one thread per warpgroup: there it is the max over
    all rows."""
    if interpret:
        return jnp.max(flags)

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA.reduce(1),),
                       return_type=plgpu.ShapeDtypeStruct((), jnp.int32, plgpu.Layout.WG_SPLAT))
    def vote(_, flags):
        i32 = ir.IntegerType.get_signless(32)
        held = None
        for reg in flags.registers.flat:  # this thread's rows, as 1-element vectors
            reg = vector.reduction(i32, vector.CombiningKind.MAXSI, reg)
            held = reg if held is None else arith.maxsi(held, reg)
        pred = arith.cmpi(arith.CmpIPredicate.ne, held, arith.constant(i32, 0))
        anyone = nvvm.vote_sync(arith.constant(i32, -1), pred, nvvm.VoteSyncKind.any)
        return mgpu.FragmentedArray.splat(arith.extui(i32, anyone), (), is_signed=True)

    return vote(flags)


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


def mma_overlapped(statics: MosaicStatics, qk, pv, *, then, softmax, state):
    """FlashAttention-3's intra-warpgroup pipelining (section 3.2, Algorithm 2): issues
    ``s = a @ b`` (``qk = (a_ref, b_ref, shape)``, shared-memory operands, fresh accumulator) and
    then ``acc + p @ v`` (``pv = (acc, p, v_ref)``, ``p`` in registers), runs ``then()``, waits for
    ``s`` alone and runs ``softmax(s, *state)`` while ``p @ v`` is still on the tensor cores.
    ``softmax`` returns new values shaped like ``state``. Returns ``(acc, *new_state)``.

    `pl.run_state` can only hand back the final values of its refs, so the softmax results travel
    out through refs initialised with ``state``. The interpreter path is `mma_into`'s.
    """
    a_ref, b_ref, shape = qk
    acc, p, v_ref = pv
    if statics.interpret:
        (s,) = mma(qk, then=then)
        new_state = softmax(s, *state)
        return (acc + jnp.dot(p, v_ref[...], preferred_element_type=jnp.float32), *new_state)

    def issue(refs):
        acc_ref, s_ref, *state_refs = refs
        plgpu.wgmma(s_ref, a_ref, b_ref)
        plgpu.wgmma(acc_ref, p, v_ref)
        then()
        s = plgpu.wgmma_accumulator_load(s_ref, wait_n=1)  # the older group: the scores only
        for ref, value in zip(state_refs, softmax(s, *(ref[...] for ref in state_refs))):
            ref[...] = value

    s_init = plgpu.ACC.init(plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA))
    acc, _, *new_state = pl.run_state(issue)((plgpu.ACC.init(acc), s_init, *state))
    # LLVM takes ``p`` as dead once the wgmma reading it is issued and may put the next P (made by
    # the softmax while that wgmma is in flight) in the same registers, after which ptxas
    # serialises every wgmma of the kernel (warning C7513; the causal 4k forward then ran at 351
    # TFLOP/s, the ping-pong alone at 575). A use of ``p`` after the wait keeps its registers
    # reserved until then.
    acc, _ = lax.optimization_barrier((acc, p))
    return (acc, *new_state)


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


def mma_first(statics: MosaicStatics, first, second, *, then, early=None, second_minus=None, minus_in_acc=False):
    """Two ``(a_ref, b_ref, shape)`` products, both operands in shared memory, issued back to back;
    the first is waited for alone and handed to ``then`` while the second is still on the tensor
    cores (FlashAttention-3 section 3.2's overlap, inside one tile). Returns ``(then(first), second)``,
    or ``(then(first, early()), second)`` with ``early()`` run before the first wait (a shared-memory
    load whose latency then hides behind the products).

    ``second_minus = (load, dim)`` subtracts the float32 vector ``load()``, laid along dimension
    ``dim`` of the second product, from it (FlashAttention-2's ``dP - delta``). By default ``load``
    runs once the second product has landed. With ``minus_in_acc`` the second accumulator starts at
    ``-load()`` instead of zeros (`MosaicConfig.delta_in_acc`): the load runs before the products are
    issued, its latency hidden behind them, and the tensor cores do the subtraction. ``then`` must
    then return one array shaped like the first product."""
    if second_minus is not None:
        load, dim = second_minus
        spread = lambda vector: lax.broadcast_in_dim(vector, second[2], [dim])
    if statics.interpret:
        a, b = mma(first, second)
        b = b if second_minus is None else b - spread(load())  # x + (-y) rounds as x - y
        return (then(a) if early is None else then(a, early())), b

    def issue_both(a_ref, b_ref):
        plgpu.wgmma(a_ref, first[0], first[1])
        plgpu.wgmma(b_ref, second[0], second[1])
        extra = () if early is None else (early(),)
        return then(plgpu.wgmma_accumulator_load(a_ref, wait_n=1), *extra)  # the older group only

    if second_minus is not None and minus_in_acc:
        init = spread(-load())

        def issue_onto(refs):
            a_ref, b_ref, out_ref = refs
            out_ref[...] = issue_both(a_ref, b_ref)

        zeros = plgpu.layout_cast(jnp.zeros(first[2], jnp.float32), plgpu.Layout.WGMMA)
        _, b, out = pl.run_state(issue_onto)((plgpu.ACC.init(zeros), plgpu.ACC.init(init), zeros))
        return out, b

    def issue(a_ref, b_ref):
        return issue_both(a_ref, b_ref), b_ref[...]

    out, b = pl.run_scoped(issue, plgpu.ACC(first[2], jnp.float32), plgpu.ACC(second[2], jnp.float32))
    return out, (b if second_minus is None else b - spread(load()))


def short_first_tile(statics: MosaicStatics) -> int:
    """Keys in a short first K/V tile of the forward, 0 when there is none. Non-causal, under the
    overlapped schedule, a key length that ``block_kv`` does not divide puts its remainder first
    (tile i > 0 starts at ``i * block_kv - (block_kv - rest)``), so every later tile is whole and
    no logit needs a mask: 176-key tiles then pay at 4096 keys, where a masked ragged last tile
    lost 2% against 128-key ones (NOTES.md, session 13). The remainder must be whole swizzle tiles
    of V (`v_transforms`), the granule of its P V contraction."""
    cfg = statics.config
    rest = statics.kv_len % cfg.block_kv
    granule = v_granule(cfg.block_kv)
    if (statics.is_causal or statics.seq_lengths or not cfg.overlap_softmax or statics.kv_len < cfg.block_kv
            or rest % granule):
        return 0
    return rest


def kv_steps(q0, *, block_q: int, block_kv: int, kv_len: int, causal: bool):
    """(K/V tiles with no masked logit, K/V tiles to visit) for query rows [q0, q0 + block_q):
    tiles of pure key padding are never visited, nor, causal, tiles right of the diagonal."""
    full, visit = kv_len // block_kv, pl.cdiv(kv_len, block_kv)
    if not causal:
        return full, visit
    return (jnp.minimum((q0 + 1) // block_kv, full),
            jnp.minimum(pl.cdiv(q0 + block_q, block_kv), visit))


def produce(steps, stages: int, parts):
    """The producer warpgroup's side of a ``stages``-deep TMA ring over ``steps`` tiles. ``parts``
    are ``(consumed, load)`` pairs: ``load(i, slot)`` issues tile i's copies into ``slot`` once every
    consumer has arrived on ``consumed[slot]`` for tile ``i - stages``. The last ``stages`` releases
    are waited on too: idle time for the producer, and every barrier phase is then observed by each
    warpgroup that uses it (the interpreter checks this)."""
    for i in range(stages):
        @pl.when(i < steps)
        def _fill():
            for _, load in parts:
                load(i, i)

    @pl.loop(stages, steps)
    def _refill(i):
        slot = lax.rem(i, stages)
        for consumed, load in parts:
            plgpu.barrier_wait(consumed.at[slot])
            load(i, slot)

    @pl.loop(jnp.maximum(steps - stages, 0), steps)
    def _last(i):
        for consumed, _ in parts:
            plgpu.barrier_wait(consumed.at[lax.rem(i, stages)])


def drain(start, stop, stages: int, parts, turn=None):
    """A consumer's side of ring tiles ``start..stop`` it has no work in (causal tiles past its
    diagonal that its partner still needs): for each ``(ready_barriers, consumed)`` part it waits
    for the tile and releases it, then takes ``turn()`` if given. Waiting before releasing keeps it
    from arriving twice on one slot's barrier before its partner has arrived once, so the
    producer's and the partner's barrier counts stay in step."""
    @pl.loop(start, stop)
    def _drain(i):
        slot = lax.rem(i, stages)
        for ready, consumed in parts:
            for barrier in ready:
                plgpu.barrier_wait(barrier.at[slot])
            plgpu.barrier_arrive(consumed.at[slot])
        if turn is not None:
            turn()


def turns(schedule, wg, *, consumers: int):
    """Tensor-core turns between consumer warpgroups (FA3 section 3.1): consumer w waits on
    ``schedule[w]`` before issuing its products and arrives on the next one's once they are issued,
    so their products reach the tensor cores in turn and one's elementwise work overlaps the
    others' products. Returns ``(take, hand_over, begin, end)``: ``begin()`` grants consumer 0 the
    first turn, ``end()`` takes that extra grant back so every barrier phase is waited on. With one
    consumer all four do nothing."""
    if consumers == 1:
        nothing = lambda: None
        return nothing, nothing, nothing, nothing
    take = lambda: plgpu.barrier_wait(schedule.at[wg])
    hand_over = lambda: plgpu.barrier_arrive(schedule.at[lax.rem(wg + 1, consumers)])
    begin = lambda: pl.when(wg == consumers - 1)(lambda: plgpu.barrier_arrive(schedule.at[0]))
    end = lambda: pl.when(wg == 0)(lambda: plgpu.barrier_wait(schedule.at[0]))
    return take, hand_over, begin, end


def _schedule_sync(barrier):
    plgpu.barrier_arrive(barrier)
    plgpu.barrier_wait(barrier)


# CTA tiles one fix-up CTA walks through (`mosaic_forward`): few CTAs, so a launch with nothing to fix
# is short.
FIXUP_TILES = 16


def _forward_kernel(q_ref, k_ref, v_ref, *refs, statics: MosaicStatics, fixup: bool):
    """The forward; with ``fixup`` (refs: ``bad, o, lse`` then the scratch) it recomputes, with the
    exact softmax, only the CTA tiles ``bad`` flags, writing into ``o`` and ``lse`` in place; each
    CTA walks `FIXUP_TILES` of them. With `MosaicStatics.seq_lengths` the refs start with the
    ``[2, B]`` query and key lengths."""
    refs = list(refs)
    lens_ref = refs.pop(0) if statics.seq_lengths else None
    bad_ref = refs.pop(0) if fixup else None
    (o_ref, lse_ref, qo_smem2, k_smem, v_smem, lse_smem2,
     k_ready, v_ready, q_ready, k_consumed, v_consumed, schedule) = refs
    cfg: MosaicConfig = statics.config
    block_q, block_kv, stages = cfg.block_q, cfg.block_kv, statics.forward_stages
    causal = statics.is_causal
    consumers = cfg.forward_consumers
    q_len_padded = statics.q_len_padded
    num_q_tiles = statics.forward_ctas
    first_keys = short_first_tile(statics)
    dtype = q_ref.dtype
    c = statics.scale * LOG2_E

    stale = cfg.uses_stale_max and not fixup
    batch = lax.axis_index("batch")
    head = lax.axis_index("heads")
    wg = lax.axis_index("wg")

    def each_tile(run):
        """``run(tile)`` for this CTA's tile, or in the fix-up for each of its flagged ones."""
        if not fixup:
            tile = lax.axis_index("q_seq")
            if causal:
                # Causal rows grow with the tile index. Pallas launches the last grid axis fastest
                # (batch, then query tiles, heads last), so each head's tiles go longest first:
                # shortest first measured 3.6-7.5% slower (NOTES.md, session 11).
                tile = num_q_tiles - 1 - tile
            run(tile)
            return

        @pl.loop(0, FIXUP_TILES)
        def _walk(i):
            tile = lax.axis_index("q_seq") * FIXUP_TILES + i
            flagged = bad_ref[batch, head, jnp.minimum(tile, num_q_tiles - 1)] > 0
            pl.when((tile < num_q_tiles) & flagged)(lambda: run(tile))

    def work_on(tile):
        """(the consumers' work, the producer's work) on CTA tile ``tile``."""
        cta_q0 = tile * (consumers * block_q)
        # Keys past kv_len are masked (zero padding, or past this batch row's length). With lengths,
        # an empty batch row still visits one masked tile, so every running max stays finite; its
        # rows are written empty. ``ragged``: some visited tile may hold keys past kv_len.
        if lens_ref is None:
            q_len, kv_len, empty = None, statics.kv_len, None
            ragged = bool(statics.kv_len % block_kv)
        else:
            q_len, kv_len = lens_ref[0, batch], lens_ref[1, batch]
            empty = kv_len == 0
            kv_len, ragged = jnp.maximum(kv_len, 1), True
        # Under the overlapped schedule a consumer whose rows all lie past the query length only
        # passes the ring and the turns on, as one past the padded length does.
        skips_rows = lens_ref is not None and cfg.overlap_softmax

        steps_for = functools.partial(kv_steps, block_q=block_q, block_kv=block_kv, kv_len=kv_len, causal=causal)
        # The last consumer with rows sees the most tiles. With three consumers the padded length need
        # not fill the last CTA: consumers past it only pass the ring and the turns on.
        last_q0 = jnp.minimum(cta_q0 + (consumers - 1) * block_q, q_len_padded - block_q)
        _, cta_steps = steps_for(last_q0)
        if skips_rows:
            cta_steps = jnp.where(cta_q0 < q_len, cta_steps, 0)

        def mask_scores(s, i, q0):
            """-inf for padded keys and, causal, keys right of the diagonal, in K/V tile ``i``. Not the
            backward's `mosaic_backward._visible` (one ``col - row`` tile): in this kernel that form
            measured 5-7% slower causal (NOTES.md, session 5)."""
            rows = plgpu.broadcasted_iota(jnp.int32, (block_q, block_kv), 0, layout=plgpu.Layout.WGMMA)
            cols = plgpu.broadcasted_iota(jnp.int32, (block_q, block_kv), 1, layout=plgpu.Layout.WGMMA)
            cols = cols + i * block_kv
            # Keys past kv_len exist only in a ragged last tile; a causal diagonal tile of a tile-multiple
            # length needs no such test (+0.1 to +1.9% causal forward at five shapes; NOTES.md, session 11).
            visible = (cols < kv_len) if ragged else None
            if causal:
                diag = cols <= rows + q0
                visible = diag if visible is None else visible & diag
            return jnp.where(visible, s, -jnp.inf)

        def online_softmax(s, m):
            """FlashAttention-2's running-max update in base 2: ``(m_new, alpha, p)``. Every row sees key
            0 in the first tile it visits, so m is finite from then on and exp2(-inf - m) is a clean 0
            for the masked logits."""
            m_new = jnp.maximum(m, s.max(axis=1) * c)
            alpha = jnp.exp2(m - m_new)
            return m_new, alpha, jnp.exp2(s * c - lax.broadcast_in_dim(m_new, s.shape, [0]))

        def rescale(acc, alpha):
            return acc * lax.broadcast_in_dim(alpha, acc.shape, [0])

        def drain_rest(steps, turn):
            drain(steps, cta_steps, stages, [((k_ready,), k_consumed), ((v_ready,), v_consumed)], turn)

        def pingpong(q0, qo_smem, acc, m, l):
            """Two tensor-core turns per tile (``Q K^T``, then ``P V``), handed over on a two-arrival
            rendezvous barrier; consumer 1 starts half a turn late, consumer 0 ends half a turn late."""
            full_steps, steps = steps_for(q0)
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
                    s = mask_scores(s, i, q0)
                m_new, alpha, p = online_softmax(s, m)
                acc = rescale(acc, alpha)
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
            if causal or ragged:  # a straddling diagonal or a ragged last tile
                carry = lax.fori_loop(full_steps, steps, functools.partial(step, masked=True), carry)
            if causal:
                drain_rest(steps, lambda: (_schedule_sync(schedule), _schedule_sync(schedule)))
            pl.when(wg == 0)(lambda: _schedule_sync(schedule))
            return carry

        def stale_softmax(s, m, l):
            """`MosaicConfig.stale_max`: P relative to ``m``, the running max of the earlier tiles, with
            no row max. A warp keeps ``m`` unless one of its rows sums past `STALE_ROW_SUM_LIMIT`; then
            its rows move up by log2 of their largest P (at least 1) and P and l shrink by its
            reciprocal, all from P, as S's registers now hold P. A logit 2^128 past ``m`` has
            overflowed P to inf, which P cannot recover: its row's l and output turn NaN (inf * 0),
            and `mosaic_forward` recomputes every CTA with a non-finite lse exactly."""
            p = jnp.exp2(s * c - lax.broadcast_in_dim(m, s.shape, [0]))
            row_sum = p.sum(axis=1)

            def keep():
                return m, l + row_sum, p.astype(dtype)

            def move_up():
                p_max = jnp.maximum(p.max(axis=1), 1.0)
                inv = 1.0 / p_max
                p_new = p * lax.broadcast_in_dim(inv, p.shape, [0])
                return m + jnp.log2(p_max), l * inv + p_new.sum(axis=1), p_new.astype(dtype)

            grew = warp_any((row_sum > STALE_ROW_SUM_LIMIT).astype(jnp.int32), interpret=statics.interpret)
            return lax.switch(grew, [keep, move_up])

        def overlapped(q0, qo_smem, acc, m, l):
            """One tensor-core turn per tile (FA3 Algorithm 2 inside the ping-pong): ``Q K_i^T`` and
            ``P_{i-1} V_{i-1}`` are issued together, then the softmax of tile i runs while
            ``P_{i-1} V_{i-1}`` is in flight. Turns go round on one-arrival barriers, one per consumer
            (consumer w waits on ``schedule[w]`` and hands over on the next), so a consumer goes on to
            its softmax as soon as its products are issued. The last consumer grants consumer 0 the
            first turn; consumer 0 takes that extra grant back at the end."""
            full_steps, steps = steps_for(q0)
            take_turn, end_turn, begin, end = turns(schedule, wg, consumers=consumers)
            k_tile = lambda slot: (qo_smem, k_smem.at[slot].transpose((1, 0)), (block_q, block_kv))
            # A straddling diagonal or a ragged last tile; with a short first tile every tile is whole.
            may_mask = causal or (ragged and not first_keys)
            if first_keys:
                full_steps = steps

            begin()
            plgpu.barrier_wait(k_ready.at[0])
            take_turn()
            first = k_tile(0)
            if first_keys:
                first = (qo_smem, k_smem.at[0, pl.ds(0, first_keys)].transpose((1, 0)), (block_q, first_keys))
            (s,) = mma(first, then=end_turn)
            plgpu.barrier_arrive(k_consumed.at[0])
            if may_mask:
                s = mask_scores(s, 0, q0)
            m, _, p = online_softmax(s, m)
            carry = (acc, m, p.sum(axis=1), p.astype(dtype))

            def step(i, carry, *, masked: bool, after_short: bool = False):
                acc, m, l, p16 = carry
                slot, prev = lax.rem(i, stages), lax.rem(i - 1, stages)
                v_prev = v_smem.at[prev, pl.ds(0, first_keys)] if after_short else v_smem.at[prev]
                # The new P leaves `mma_overlapped` through a ref made from the state: a whole tile's shape.
                p_state = jnp.zeros((block_q, block_kv), dtype) if after_short else p16

                def softmax(s, m, l, _):
                    plgpu.barrier_arrive(k_consumed.at[slot])
                    if masked:
                        s = mask_scores(s, i, q0)
                    if stale:
                        return stale_softmax(s, m, l)
                    m_new, alpha, p = online_softmax(s, m)
                    return m_new, l * alpha + p.sum(axis=1), p.astype(dtype)

                plgpu.barrier_wait(k_ready.at[slot])
                plgpu.barrier_wait(v_ready.at[prev])
                take_turn()
                acc, m_new, l, p16 = mma_overlapped(statics, k_tile(slot), (acc, p16, v_prev),
                                                    then=end_turn, softmax=softmax, state=(m, l, p_state))
                plgpu.barrier_arrive(v_consumed.at[prev])
                # acc now holds every tile before i relative to m; tile i's P is relative to m_new.
                if not stale:
                    return rescale(acc, jnp.exp2(m - m_new)), m_new, l, p16
                moved = warp_any((m_new > m).astype(jnp.int32), interpret=statics.interpret)
                acc = lax.switch(moved, [lambda: acc, lambda: rescale(acc, jnp.exp2(m - m_new))])
                return acc, m_new, l, p16

            unmasked_end = jnp.maximum(full_steps, 1)
            loop_start = 1
            if first_keys:  # P of the short tile: its own P V shape (kv_len > block_kv, so tile 1 exists)
                carry = step(1, carry, masked=False, after_short=True)
                loop_start = 2
            carry = lax.fori_loop(loop_start, unmasked_end, functools.partial(step, masked=False), carry)
            if may_mask:
                carry = lax.fori_loop(unmasked_end, steps, functools.partial(step, masked=True), carry)
            acc, m, l, p16 = carry
            last = lax.rem(steps - 1, stages)
            plgpu.barrier_wait(v_ready.at[last])
            take_turn()
            (acc,) = mma_into(statics, (acc, p16, v_smem.at[last]), then=end_turn)
            plgpu.barrier_arrive(v_consumed.at[last])
            if causal:
                drain_rest(steps, lambda: (take_turn(), end_turn()))
            end()
            return acc, m, l

        def idle(q0=None):
            """A consumer with no rows (past the padded length, or from ``q0`` on past the query
            length, whose rows it writes empty): every ring tile and every turn (one per tile and one
            for the last ``P V``) passes through it untouched."""
            take_turn, end_turn, begin, end = turns(schedule, wg, consumers=consumers)
            begin()
            drain_rest(0, lambda: (take_turn(), end_turn()))
            take_turn()
            end_turn()
            end()
            if q0 is not None:
                pl.when(q0 < q_len_padded)(lambda: write_empty(q0))

        def write_empty(q0):
            qo_smem2.at[wg][...] = plgpu.layout_cast(jnp.zeros((block_q, statics.head_dim_padded), dtype),
                                                     plgpu.Layout.WGMMA)
            lse_smem2.at[wg][...] = plgpu.layout_cast(jnp.full((block_q,), -jnp.inf, jnp.float32),
                                                      plgpu.Layout.WGMMA.reduce(1))
            send(q0)

        def send(q0):
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(qo_smem2.at[wg], o_ref.at[batch, pl.ds(q0, block_q), head])
            plgpu.copy_smem_to_gmem(lse_smem2.at[wg], lse_ref.at[batch, head, pl.ds(q0, block_q)])
            plgpu.wait_smem_to_gmem(0)

        def work(q0):
            qo_smem, lse_smem = qo_smem2.at[wg], lse_smem2.at[wg]
            plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(q0, block_q), head], qo_smem, q_ready.at[wg])
            plgpu.barrier_wait(q_ready.at[wg])

            m = plgpu.layout_cast(jnp.full((block_q,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            l = plgpu.layout_cast(jnp.zeros((block_q,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            acc = plgpu.layout_cast(jnp.zeros((block_q, statics.head_dim_padded), jnp.float32),
                                    plgpu.Layout.WGMMA)
            acc, m, l = (overlapped if cfg.overlap_softmax else pingpong)(q0, qo_smem, acc, m, l)

            inv_l = 1.0 / l  # one reciprocal per row instead of a divide per element
            if lens_ref is not None:
                # Rows past the query length, and every row of a batch row without keys, see no key:
                # zero output and a -inf log-sum-exp, as the reference has them.
                rows = plgpu.broadcasted_iota(jnp.int32, (block_q,), 0, layout=plgpu.Layout.WGMMA.reduce(1))
                valid = rows < jnp.where(empty, 0, q_len - q0)
                inv_l = jnp.where(valid, inv_l, 0.0)
            qo_smem[...] = (acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])).astype(dtype)
            lse = m + jnp.log2(l)
            lse_smem[...] = lse if lens_ref is None else jnp.where(valid, lse, -jnp.inf)
            send(q0)

        def consumer():
            q0 = cta_q0 + wg * block_q
            if skips_rows:
                pl.when(q0 < q_len)(lambda: work(q0))
                pl.when(q0 >= q_len)(lambda: idle(q0))
            elif consumers == 2:  # the padded length is a multiple of two consumers' rows
                work(q0)
            else:
                pl.when(q0 < q_len_padded)(lambda: work(q0))
                pl.when(q0 >= q_len_padded)(idle)

        def producer():
            kv_head = lax.div(head, jnp.asarray(statics.groups, head.dtype))

            def load(ref, smem, ready):
                def issue(i, slot):
                    if first_keys and isinstance(i, int) and i == 0:
                        rows = (batch, pl.ds(0, first_keys), kv_head)
                        plgpu.copy_gmem_to_smem(ref.at[rows], smem.at[slot, pl.ds(0, first_keys)], ready.at[slot])
                        return
                    start = i * block_kv - (block_kv - first_keys) if first_keys else i * block_kv
                    # A ragged last tile may reach past the padded keys: the TMA fills those rows with zeros.
                    rows = (batch, pl.ds(start, block_kv), kv_head)
                    plgpu.copy_gmem_to_smem(ref.at[rows], smem.at[slot], ready.at[slot])
                return issue

            produce(cta_steps, stages, [(k_consumed, load(k_ref, k_smem, k_ready)),
                                        (v_consumed, load(v_ref, v_smem, v_ready))])

        return consumer, producer

    @pl.when(wg < consumers)
    def _consumer():
        plgpu.set_max_registers(_CONSUMER_REGISTERS_BY_COUNT[consumers], action="increase")
        each_tile(lambda tile: work_on(tile)[0]())

    @pl.when(wg == consumers)
    def _producer():
        plgpu.set_max_registers(_PRODUCER_REGISTERS, action="decrease")
        each_tile(lambda tile: work_on(tile)[1]())


def mosaic_forward(q, k, v, lengths=None, *, statics: MosaicStatics):
    """Returns ``(out [B, T, N, H], lse2 [B, N, T] float32)`` like `forward.flash_forward`.

    Inputs arrive padded (`MosaicStatics.pad_inputs`): T to a multiple of ``2 * block_q``, S to a
    multiple of ``block_kv``, H to a multiple of 64; the outputs are sliced back here. ``lengths``
    (with `MosaicStatics.seq_lengths`): ``[2, B]`` int32 query and key lengths within ``[0, T]``
    and ``[0, S]``.
    """
    B, T, N, H = q.shape
    q, k, v = statics.pad_inputs(q, k, v)
    cfg = statics.config
    tiles = statics.forward_tiles
    past_array = not short_first_tile(statics) and k.shape[1] < tiles * cfg.block_kv
    if past_array and (statics.interpret or tiles <= statics.forward_stages):
        # A last tile past the array (never after a short first tile: the last then ends at the key
        # length): the TMA reads zeros there, but the interpreter clamps the slice, and Pallas
        # rejects one with a static start (a tile of the ring's first fill), so those take a copy
        # (a short key length).
        extra = tiles * cfg.block_kv - k.shape[1]
        k, v = (jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, 0))) for x in (k, v))
    Tp, Hp = q.shape[1], q.shape[3]
    lens = (lengths,) if statics.seq_lengths else ()
    stages = statics.forward_stages
    consumers = cfg.forward_consumers
    transforms = smem_transforms(q.dtype)
    scratch = [
        plgpu.SMEM((consumers, cfg.block_q, Hp), q.dtype, transforms=transforms),
        plgpu.SMEM((stages, cfg.block_kv, Hp), q.dtype, transforms=transforms),
        plgpu.SMEM((stages, cfg.block_kv, Hp), q.dtype, transforms=v_transforms(q.dtype, cfg.block_kv)),
        plgpu.SMEM((consumers, cfg.block_q), jnp.float32),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=consumers),
        plgpu.Barrier(num_arrivals=consumers, num_barriers=stages),
        plgpu.Barrier(num_arrivals=consumers, num_barriers=stages),
        # Ping-pong: one rendezvous barrier; overlapped: one "your turn" barrier per consumer.
        (plgpu.Barrier(num_barriers=consumers) if cfg.overlap_softmax
         else plgpu.Barrier(num_arrivals=consumers)),
    ]
    # The last grid axis launches fastest: a head's query tiles run side by side and share its K/V in
    # L2. Heads launched before query tiles measured 4-7% slower causal at 4k (fwd and fwd+bwd),
    # -2 to +1% at 16k (NOTES.md, session 11).
    out, lse = launch(
        functools.partial(_forward_kernel, fixup=False), statics=statics,
        out_type=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, N, Tp), jnp.float32)],
        scratch=scratch, grid=(N, statics.forward_ctas, B),
        grid_names=("heads", "q_seq", "batch"), consumers=consumers, name="pallas_flash_mosaic_forward",
    )(q, k, v, *lens)
    if cfg.uses_stale_max:
        # Rows whose P overflowed under the stale maximum came out NaN (`stale_softmax`): a second,
        # short launch recomputes their CTA tiles with the exact softmax, in place. Any other
        # non-finite lse (NaN or inf inputs) takes it too and comes out as the exact kernel has it;
        # rows that see no key (past the lengths) are -inf by design and do not.
        ctas, rows = statics.forward_ctas, consumers * cfg.block_q
        tail = ((0, 0), (0, 0), (0, ctas * rows - Tp))
        wrong = ~jnp.isfinite(lse)
        if lens:
            sees_keys = (jnp.arange(Tp) < lengths[0][:, None]) & (lengths[1][:, None] > 0)  # [B, Tp]
            wrong &= sees_keys[:, None, :]
        bad = jnp.any(jnp.pad(wrong, tail).reshape(B, N, ctas, rows), axis=-1).astype(jnp.int32)

        def fix(out, lse):
            out_ref, lse_ref = jax.new_ref(out), jax.new_ref(lse)
            launch(
                functools.partial(_forward_kernel, fixup=True), statics=statics, out_type=[], scratch=scratch,
                grid=(N, pl.cdiv(ctas, FIXUP_TILES), B), grid_names=("heads", "q_seq", "batch"),
                consumers=consumers, name="pallas_flash_mosaic_forward_fixup",
            )(q, k, v, *lens, bad, out_ref, lse_ref)
            return out_ref[...], lse_ref[...]

        if statics.interpret:
            # The interpreter steps through every CTA of a launch, flagged tiles or none (about 3 s
            # a call on CPU), so there the fix-up runs only when a tile is flagged. The GPU keeps the
            # unconditional launch (8-17 us with nothing flagged: NOTES.md, session 18); a
            # conditional there was not measured.
            out, lse = lax.cond(jnp.any(bad > 0), fix, lambda out, lse: (out, lse), out, lse)
        else:
            out, lse = fix(out, lse)
    return out[:, :T, :, :H], lse[:, :, :T]
