"""Tuning knobs of the Pallas kernels (Triton backend: `FlashConfig`; Mosaic GPU: `MosaicConfig`).

Only *how* the work is tiled lives here; *what* is computed (causality, windows, lengths) lives in
`masking.MaskSpec`, so a tuning change can never change a result.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import numpy as np

from pallas_flash.masking import MaskSpec


def is_power_of_two(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def _plain_fields(config, check) -> None:
    """Type-checks every field of a frozen config (bool where annotated so, else int) and stores it
    as a plain Python value, so configs hash and compare by value; then ``check(name, value)``."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.type == "bool":
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"{type(config).__name__}.{field.name} must be a bool, got {value!r}")
            value = bool(value)
        else:
            if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)):
                raise ValueError(f"{type(config).__name__}.{field.name} must be an int, got {value!r}")
            value = int(value)
        object.__setattr__(config, field.name, value)
        check(field.name, value)


@dataclasses.dataclass(frozen=True)
class FlashConfig:
    """Block sizes, warps and software-pipelining depth of the forward and backward kernels.

    Every block size must be a power of two >= 16 (Triton tiles and tensor-core `dot`s need it).
    The backward has two kernels: dK/dV keeps a `block_k_dkv` slab of K/V resident and streams
    `block_q_dkv` rows of Q/dO past it; dQ keeps `block_q_dq` rows of Q/dO and streams K/V.
    """

    block_q: int = 128
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3
    block_q_dkv: int = 64
    block_k_dkv: int = 128
    block_q_dq: int = 128
    block_k_dq: int = 64
    num_warps_bwd: int = 8
    num_stages_bwd: int = 2

    def __post_init__(self):
        _plain_fields(self, self._check)

    @staticmethod
    def _check(name: str, value: int):
        if name.startswith("block_") and (value < 16 or not is_power_of_two(value)):
            raise ValueError(f"FlashConfig.{name} must be a power of two >= 16, got {value}")
        if name.startswith("num_warps") and value not in (1, 2, 4, 8, 16):
            raise ValueError(f"FlashConfig.{name} must be one of 1, 2, 4, 8, 16, got {value}")
        if name.startswith("num_stages") and value < 1:
            raise ValueError(f"FlashConfig.{name} must be >= 1, got {value}")

    def replace(self, **changes) -> "FlashConfig":
        return dataclasses.replace(self, **changes)


def _clip(block: int, length: int) -> int:
    """Shrinks a block for short sequences: no tile larger than the padded sequence."""
    return max(16, min(block, 1 << max(4, (length - 1).bit_length())))


@functools.lru_cache(maxsize=None)
def device_kind() -> str:
    """The first device's kind, e.g. "NVIDIA H100 80GB HBM3" or "cpu"."""
    return jax.devices()[0].device_kind


def default_config(*, q_len: int, kv_len: int, head_dim: int, dtype_bytes: int,
                   device: str | None = None) -> FlashConfig:
    """A heuristic per shape and device; see `benchmarks/` and NOTES.md for the measurements behind it.

    At large head dims both limits bite: a streamed (block, head_dim) bf16 tile costs
    block * head_dim * 2 bytes of shared memory per pipeline stage, a resident float32 accumulator
    block * head_dim * 4 bytes of registers.
    """
    padded = max(16, 1 << (head_dim - 1).bit_length())
    wide = dtype_bytes >= 4
    # Each row is the best of a forward and a backward sweep at 4x4096xNx{64,128,256} bf16 on the
    # H100 (`benchmarks/tune.py`, NOTES.md); head dim 64's backward also at 1x16384.
    if padded <= 64:
        cfg = FlashConfig(block_q=64, block_k=128, num_warps=4, num_stages=2,
                          block_q_dkv=64, block_k_dkv=64, block_q_dq=64, block_k_dq=64,
                          num_warps_bwd=4, num_stages_bwd=2)
    elif padded <= 128:
        cfg = FlashConfig(block_q=128, block_k=64, num_warps=4, num_stages=2,
                          block_q_dkv=64, block_k_dkv=64, block_q_dq=64, block_k_dq=64,
                          num_warps_bwd=4, num_stages_bwd=2)
    else:
        # The backward's float32 dK/dV (or dQ) accumulators of a 256-wide head fill the registers
        # at 32 rows already; larger tiles spill.
        cfg = FlashConfig(block_q=128, block_k=64, num_warps=8, num_stages=2,
                          block_q_dkv=32, block_k_dkv=32, block_q_dq=32, block_k_dq=32,
                          num_warps_bwd=4, num_stages_bwd=2)
    if wide:
        # float32 tiles are twice the bytes: halve the resident dimension to stay inside shared memory.
        cfg = cfg.replace(block_q=max(16, cfg.block_q // 2), block_q_dq=max(16, cfg.block_q_dq // 2),
                          block_k_dkv=max(16, cfg.block_k_dkv // 2), num_stages=min(cfg.num_stages, 2))
        if padded > 128:
            cfg = cfg.replace(block_k=32, num_stages=1)
    device = device_kind() if device is None else device
    if not any(tag in device for tag in ("H100", "H200", "H800", "H20", "GH200")):
        # Only Hopper was measured; pre-Hopper parts have less shared memory per SM, so pipeline
        # less deeply rather than fail to compile.
        cfg = cfg.replace(block_q=min(cfg.block_q, 64), num_stages=min(cfg.num_stages, 2), num_stages_bwd=1)
    return cfg.replace(
        block_q=_clip(cfg.block_q, q_len),
        block_k=_clip(cfg.block_k, kv_len),
        block_q_dkv=_clip(cfg.block_q_dkv, q_len),
        block_k_dkv=_clip(cfg.block_k_dkv, kv_len),
        block_q_dq=_clip(cfg.block_q_dq, q_len),
        block_k_dq=_clip(cfg.block_k_dq, kv_len),
    )


@dataclasses.dataclass(frozen=True)
class FlashStatics:
    """Everything static about one attention call: the custom_vjp's single non-differentiable argument.

    ``scale`` multiplies the logits (natural units); ``tuning`` only tiles the work; ``mask`` (a
    `masking.MaskSpec`) decides what is computed; ``mosaic`` picks the Hopper kernels.
    """

    mask: MaskSpec
    scale: float
    head_dim: int
    tuning: FlashConfig
    interpret: bool = False
    # Set: the Mosaic GPU (Hopper) kernels run the forward and, where `mosaic_backward` supports
    # the call, the backward; the Triton backward takes the rest from the same residuals.
    mosaic: "MosaicStatics | None" = None

    @property
    def head_dim_padded(self) -> int:
        """Triton tiles are powers of two and tensor-core dots want >= 16 columns."""
        return max(16, 1 << (self.head_dim - 1).bit_length())


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """Tiling of the Mosaic GPU (Hopper, FlashAttention-3 style) kernels.

    Forward: each of the ``forward_consumers`` consumer warpgroups (2, or 3 with ``overlap_softmax``)
    owns ``block_q`` query rows (a CTA ``forward_consumers * block_q``) and streams ``block_kv`` key
    rows through a ``num_stages`` deep TMA ring. Backward: dK/dV gives each consumer
    ``block_kv_dkv`` resident key rows and streams ``block_q_dkv`` query rows; dQ gives each
    consumer ``block_q_dq`` resident query rows and streams ``block_kv_dq`` key rows.
    wgmma works on 64-row slabs per warpgroup, so every block is a multiple of 64, except the
    forward's K/V tile, a multiple of 16 (FlashAttention-3's 176 keys; V then takes a narrower
    swizzle, `mosaic_forward.v_transforms`).

    ``overlap_softmax`` turns on FlashAttention-3's intra-warpgroup pipelining in the forward
    (section 3.2): each consumer issues the next tile's ``Q K^T`` together with the current ``P V``
    and runs the softmax while ``P V`` is in flight. It keeps a second score tile and a second P in
    registers, so it pays off only where those fit next to the accumulator (64-row consumers,
    head dim <= 128); elsewhere the registers spill. Three consumers get 160 registers each instead
    of 240: enough for 64 x 128 score tiles at head dim 64, not at 128.

    ``fuse_dq`` makes the dK/dV kernel also accumulate dQ (FlashAttention-2 Algorithm 2 as written,
    five products per tile pair) instead of a separate dQ kernel that recomputes ``S`` and ``dP``
    (seven). Each CTA's partial dQ goes to HBM as one fixed-point int32 per element through a TMA
    reduce-add, which is order-free, so the gradients stay bitwise deterministic; each CTA's
    truncation costs less than 2^-30 of a per-row bound on dQ (`mosaic_backward`). Head dims up to
    128, and the two consumers must be able to split a ``block_q_dkv x H`` dQ tile into 64-row
    slabs (``block_q_dkv`` a multiple of 128, or ``H`` of 128: `dq_split`). On by default only where
    it measured faster (`default_mosaic_config`).

    ``delta_in_acc`` starts dP's accumulator (dP^T's in the dK/dV kernel) at ``-delta`` instead of
    zero, so the tensor cores hand back ``dP - delta`` and dS is one multiply by P: the dK/dV kernel
    loads a step's delta row vector before issuing dP^T, where its latency hides behind S^T, instead
    of after dP^T's wait, on the path to dK. The split dK/dV kernel above head dim 128 subtracts as
    before (only its dQ kernel follows the switch).

    ``stale_max`` (with ``overlap_softmax``) drops the forward's per-tile row max: a tile's P is taken
    relative to the running max of the earlier tiles, and only a warp one of whose rows sums past
    `mosaic_forward.STALE_ROW_SUM_LIMIT` moves its max up, from P (FlashAttention-4's conditional
    rescaling taken one step further: no max at all on the common path). A row whose logits jump
    2^128 past its max (P overflows) comes out NaN, and a short second launch recomputes the CTA
    tiles with a non-finite lse exactly, in place. The results are those of the exact softmax up
    to rounding, not bit for bit.

    ``stagger_bwd`` starts the second consumer of each backward kernel half a step behind the first
    (one barrier, once per CTA), so their elementwise work and products alternate from the first
    step instead of colliding until they drift apart. No turns are forced after that: explicit
    turns measured slower in these kernels (NOTES.md, session 4).
    """

    block_q: int = 64
    block_kv: int = 128
    num_stages: int = 2
    block_q_dkv: int = 64
    block_kv_dkv: int = 64
    block_q_dq: int = 64
    block_kv_dq: int = 64
    num_stages_bwd: int = 2
    overlap_softmax: bool = False
    fuse_dq: bool = False
    stagger_bwd: bool = False
    forward_consumers: int = 2
    stale_max: bool = False
    delta_in_acc: bool = False

    def __post_init__(self):
        _plain_fields(self, self._check)
        if self.forward_consumers == 3 and not self.overlap_softmax:
            # The ping-pong schedule's rendezvous barrier pairs exactly two consumers.
            raise ValueError("MosaicConfig.forward_consumers=3 needs overlap_softmax=True")

    @staticmethod
    def _check(name: str, value):
        if name == "forward_consumers" and value not in (2, 3):
            raise ValueError(f"MosaicConfig.forward_consumers must be 2 or 3, got {value}")
        if name == "block_kv" and (value < 64 or value % 16):
            raise ValueError(f"MosaicConfig.block_kv must be a multiple of 16 and >= 64, got {value}")
        if name.startswith("block_") and name != "block_kv" and (value < 64 or value % 64):
            raise ValueError(f"MosaicConfig.{name} must be a positive multiple of 64, got {value}")
        if name.startswith("num_stages") and value < 2:
            # One slot could not be refilled while its partner consumer still reads it.
            raise ValueError(f"MosaicConfig.{name} must be >= 2, got {value}")

    def replace(self, **changes) -> "MosaicConfig":
        return dataclasses.replace(self, **changes)

    @property
    def uses_stale_max(self) -> bool:
        """Whether the forward runs the stale maximum: it rides on the overlapped schedule's softmax,
        so ``stale_max`` without ``overlap_softmax`` is the exact softmax (and no fix-up launch)."""
        return self.stale_max and self.overlap_softmax

    def smem_bytes(self, head_dim: int, dtype_bytes: int = 2) -> dict[str, int]:
        """Shared memory of each kernel (operand tiles only), to reject configs that cannot launch.
        Above head dim 128 the dK/dV kernel's two consumers share one key block and the dQ kernel
        runs one consumer (`mosaic_backward`)."""
        hp = _round_up(head_dim, 64)
        # Two resident tiles (K and V, or Q and dO) per consumer, two in all when split, where the
        # dK/dV kernel also hands P^T over through a tile per ring slot.
        wide = splits_backward(head_dim)
        resident = 1 if wide else 2
        sizes = {
            "forward": ((self.forward_consumers * self.block_q + 2 * self.num_stages * self.block_kv)
                        * hp * dtype_bytes),
            "dkv": ((2 * resident * self.block_kv_dkv + 2 * self.num_stages_bwd * self.block_q_dkv) * hp * dtype_bytes
                    + wide * self.num_stages_bwd * self.block_q_dkv * self.block_kv_dkv * dtype_bytes),
            "dq": (2 * resident * self.block_q_dq + 2 * self.num_stages_bwd * self.block_kv_dq) * hp * dtype_bytes,
        }
        if self.fuse_dq and not wide:
            # Two buffers of both consumers' dS^T tiles, and the dQ tile's int32s staged for the TMA.
            sizes["dkv"] += 4 * self.block_kv_dkv * self.block_q_dkv * dtype_bytes + self.block_q_dkv * hp * 4
            del sizes["dq"]
        return sizes


def dq_split(block_q: int, head_dim_padded: int) -> str | None:
    """How the two consumers of the fused dK/dV/dQ kernel share a step's ``block_q x H`` dQ tile:
    by rows when each half is whole 64-row wgmma slabs, else by 64-column halves (a 128-byte
    swizzle tile, so the operand slices stay tile-aligned); None when neither fits."""
    if block_q % 128 == 0:
        return "rows"
    if head_dim_padded % 128 == 0:
        return "cols"
    return None


def splits_backward(head_dim: int) -> bool:
    """Whether the Mosaic backward runs its "split" form at this head dim: above 128 (padded), two
    64 x H float32 accumulators per consumer no longer fit in registers, so the dK/dV kernel's two
    consumers share one key block and the dQ kernel runs one consumer (`mosaic_backward`)."""
    return _round_up(head_dim, 64) > 128


# H100 shared memory per CTA (227 KiB) less room for barriers, the log-sum-exp tiles and alignment:
# 224 KiB of operand tiles measured over the limit (Mosaic asked for 232,576 of 232,448 bytes).
MOSAIC_SMEM_LIMIT = 220 * 1024


def v_granule(rows: int) -> int:
    """Keys in one swizzle tile of a ``rows``-key V tile (16-bit elements, as the Mosaic kernels
    take): Mosaic GPU contracts P V over whole swizzle tiles, so V takes the widest swizzle whose
    width divides its keys: 64 keys (128 bytes) for 128-key tiles, 16 (32 bytes) for 176
    (`mosaic_forward.v_transforms`). A short first tile must be whole granules too."""
    for granule in (64, 32, 16):
        if rows % granule == 0:
            return granule
    raise ValueError(f"no swizzle fits {rows} keys")


def default_mosaic_config(*, head_dim: int, is_causal: bool = False, q_len: int | None = None) -> MosaicConfig:
    """Per-head-dim defaults, from the H100 sweeps in NOTES.md (and H200 ones from session 27 on);
    ``q_len`` (the query length, when known) picks the forward's consumers at head dim 64 (two below
    4096 rows, three from there) and, non-causal at head dim 128, the fused dQ from 16384 rows."""
    hp = _round_up(head_dim, 64)
    # Head dim 64's products are half as long as 128's for as many exponentials, so two consumers
    # cannot hide one's softmax behind the other's products: three 64-row consumers with the
    # intra-warpgroup overlap (FA3's head-dim-64 forward) measured +7 to +10% non-causal at 4k, 8k
    # and 16k, +0 to +4% causal, over the two ping-pong consumers below (128 rows each non-causal,
    # 64 causal); at 2k -1% and -3%, at 1k -9% in both (fewer, longer CTAs; NOTES.md, session 8). Its
    # backward streams 128 query rows through the dK/dV kernel and 128 keys through the dQ kernel
    # (+10% fwd+bwd non-causal, +2-4% causal at 4k and 16k over 64-row tiles), with its two
    # consumers staggered (+3 to +7% fwd+bwd at 4k and 16k, causal and not, in two runs; at head dim
    # 128 -2 to +2%, so not there: NOTES.md, session 7).
    if hp <= 64:
        backward = dict(block_q_dkv=128, block_kv_dq=128, stagger_bwd=True)
        if q_len is None or q_len >= 4096:
            # The stale maximum: forward +4 to +8% non-causal at 4k and 16k; causal 0% at 16k and
            # -3 to -4% at 4k (NOTES.md, session 18), so off there.
            return MosaicConfig(block_q=64, block_kv=128, num_stages=2, overlap_softmax=True, forward_consumers=3,
                                stale_max=not is_causal, **backward)
        return MosaicConfig(block_q=64 if is_causal else 128, block_kv=128, num_stages=2, **backward)
    if hp <= 128:
        # dP's accumulator started at -delta: fwd+bwd +1 to +7% non-causal at 4k and 16k and +3 to +6%
        # causal at 4k; causal at 16k -0.3 and +1.6% against session 9's early delta load, which it
        # replaces. At head dim 64 -2 to +1% and at 256 -1 to -5%, so off there (NOTES.md, session 23).
        # The stale maximum (128-key tiles, which beat 176-key ones with it): forward +3 to +5%
        # non-causal at 4k and 16k (NOTES.md, session 17), +5 to +8% causal with the fix-up launch
        # (session 18; an in-kernel exact second pass had cost the causal gain).
        # dQ fused into the dK/dV kernel (one truncated int32 per element), non-causal from 16k
        # query rows: fwd+bwd +1 to +4% at 16k and +4 to +5% at 32k over the two kernels, at 8k -1
        # to +1%, at 4k -6%, causal -3 to -10% (H200; NOTES.md, session 28).
        fuse_dq = not is_causal and q_len is not None and q_len >= 16384
        return MosaicConfig(block_q=64, block_kv=128, num_stages=2, block_kv_dq=128, overlap_softmax=True,
                            stale_max=True, delta_in_acc=True, fuse_dq=fuse_dq)
    # Only one forward tiling of a 256-wide head fits shared memory with a two-slot ring. The stale
    # maximum: forward +4 to +12% non-causal at 4k and 16k, causal +4 to +6% at 4k and -1 to +1% at
    # 16k (NOTES.md, session 18).
    return MosaicConfig(block_q=64, block_kv=64, num_stages=2, overlap_softmax=True, stale_max=True)


@dataclasses.dataclass(frozen=True)
class MosaicStatics:
    """Everything static about one call of the Mosaic GPU kernels.

    Sequences are zero-padded to tile multiples of every kernel (``pad_inputs``); tiles of pure
    padding are never visited. Padded keys are masked in the forward and the dQ kernel; padded
    query rows carry zero dO, so they add nothing to dK/dV.

    ``seq_lengths``: the kernels also take per-batch query and key lengths (a ``[2, B]`` int32
    array, read in the kernels), and skip the tiles past them.
    """

    config: MosaicConfig
    scale: float
    is_causal: bool
    q_len: int
    kv_len: int
    head_dim: int
    groups: int
    interpret: bool = False
    detect_races: bool = False
    seq_lengths: bool = False

    @property
    def head_dim_padded(self) -> int:
        return _round_up(self.head_dim, 64)

    @property
    def q_len_padded(self) -> int:
        c = self.config
        return _round_up(self.q_len, math.lcm(2 * c.block_q, c.block_q_dkv, 2 * c.block_q_dq))

    @property
    def kv_len_padded(self) -> int:
        """Keys padded to the backward's tiles. The forward's K/V tile need not divide this: its last
        tile may reach past the array, where the TMA reads zeros, so a 176-key tile costs no copy."""
        c = self.config
        multiple = math.lcm(2 * c.block_kv_dkv, c.block_kv_dq)
        return _round_up(self.kv_len, multiple)

    @property
    def forward_ctas(self) -> int:
        """Forward CTAs per (batch, head) along the queries, ``forward_consumers * block_q`` rows
        each; with three consumers the last one may hold fewer rows than consumers."""
        c = self.config
        return -(-self.q_len_padded // (c.forward_consumers * c.block_q))

    @property
    def forward_tiles(self) -> int:
        """K/V tiles the forward visits per query row block (non-causal)."""
        return -(-self.kv_len // self.config.block_kv)

    @property
    def forward_stages(self) -> int:
        return min(self.config.num_stages, self.forward_tiles)

    def pad_inputs(self, q, k, v):
        """Zero-pads ``q [B, T, N, H]`` and ``k, v [B, S, K, H]`` to the padded lengths."""
        dh = self.head_dim_padded - self.head_dim
        k = _pad(k, self.kv_len_padded - self.kv_len, dh)
        v = _pad(v, self.kv_len_padded - self.kv_len, dh)
        return self.pad_queries(q), k, v

    def pad_queries(self, x):
        """Zero-pads a ``[B, T, N, H]`` query-side array (Q, dO) to the padded lengths."""
        return _pad(x, self.q_len_padded - self.q_len, self.head_dim_padded - self.head_dim)


def _pad(x, rows: int, cols: int):
    if rows == 0 and cols == 0:
        return x
    return jax.numpy.pad(x, ((0, 0), (0, rows), (0, 0), (0, cols)))
