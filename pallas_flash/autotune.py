"""Pick the fastest `MosaicConfig` for one problem on your own GPU, and remember it.

    cfg = pallas_flash.autotune.autotune(q, k, v, is_causal=True)   # times candidates once
    out = pallas_flash.dot_product_attention(q, k, v, is_causal=True, implementation="mosaic", config=cfg)

Results are cached in a JSON file (``$PALLAS_FLASH_TUNING_CACHE``, else
``~/.cache/pallas_flash/mosaic_tuning.json``) keyed by device kind, jax version, shapes, dtype,
causality and the timed pass, so later calls (and later processes) return at once. The shipped
defaults (`config.default_mosaic_config`) come from the same kind of sweep on an H100.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp

from pallas_flash.config import MOSAIC_SMEM_LIMIT, MosaicConfig, default_mosaic_config, splits_backward
from pallas_flash.timing import median_seconds


def mosaic_candidates(head_dim: int, base: MosaicConfig | None = None) -> tuple[list, list]:
    """(forward candidates, backward candidates) around ``base``: the forward varies the query rows
    per consumer, the K/V tile, the ring depth, the softmax schedule, the stale maximum (with the
    overlapped schedule) and (head dim 64) the number of consumers; the backward the tiles of both
    kernels, its ring depth, whether its consumers start staggered (where the backward is not
    split, `config.splits_backward`) and whether dP accumulates onto -delta
    (`MosaicConfig.delta_in_acc`). Configs over the shared-memory budget are left out."""
    base = base or default_mosaic_config(head_dim=head_dim)
    # The overlapped softmax holds a second score tile: with 128-row consumers it cannot fit. Three
    # consumers need it (`MosaicConfig`), and their 160 registers hold its tiles at head dim 64 only.
    # The stale maximum rides on it, and moved the forward by -4 to +12% (NOTES.md, session 18).
    fwd = [base.replace(block_q=bq, block_kv=bk, num_stages=s, overlap_softmax=o, forward_consumers=n,
                        stale_max=st)
           for bq, bk, s, o, n, st in itertools.product((64, 128), (64, 128, 176, 192), (2, 3, 4), (False, True),
                                                        (2, 3), (False, True))
           if not (o and bq > 64) and (n == 2 or (o and head_dim <= 64)) and (o or not st)]
    tiles = ((64, 64, 64, 64), (128, 64, 64, 128), (64, 64, 64, 128), (128, 64, 64, 64))
    # The split backward (head dims above 128) has no staggered start, so trying both would time the
    # same kernels twice over.
    staggers = (False,) if splits_backward(head_dim) else (False, True)
    bwd = [base.replace(block_q_dkv=a, block_kv_dkv=b, block_q_dq=c, block_kv_dq=d, num_stages_bwd=s,
                        stagger_bwd=st, delta_in_acc=da)
           for (a, b, c, d), s, st, da in itertools.product(tiles, (2, 3), staggers, (False, True))]
    fits = lambda c, kernels: all(c.smem_bytes(head_dim)[k] <= MOSAIC_SMEM_LIMIT for k in kernels)
    return [c for c in fwd if fits(c, ("forward",))], [c for c in bwd if fits(c, ("dkv", "dq"))]


def cache_path() -> Path:
    env = os.environ.get("PALLAS_FLASH_TUNING_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "pallas_flash" / "mosaic_tuning.json"


def _key(q, k, is_causal: bool, pass_: str) -> str:
    return json.dumps(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, q=list(q.shape),
                           k=list(k.shape), dtype=str(q.dtype), causal=bool(is_causal), pass_=pass_),
                      sort_keys=True)


def autotune(q, k, v, *, is_causal: bool = False, pass_: str = "fwdbwd", candidates=None,
             rounds: int = 3, calls: int = 5, use_cache: bool = True, verbose: bool = False,
             timer=None) -> MosaicConfig:
    """The fastest of ``candidates`` (default: `mosaic_candidates`) for these inputs.

    ``pass_="fwd"`` times the forward only; ``"fwdbwd"`` tunes the forward tiles on the forward and
    then the backward tiles on forward+backward, keeping the best forward tiles. Candidates that
    fail to compile count as infinitely slow. Timing is only meaningful on a GPU. ``timer(config,
    backward) -> seconds`` replaces the built-in median-of-rounds clock.
    """
    from pallas_flash.api import dot_product_attention  # the API imports this module's package

    if pass_ not in ("fwd", "fwdbwd"):
        raise ValueError(f"pass_ must be 'fwd' or 'fwdbwd', got {pass_!r}")
    key = _key(q, k, is_causal, pass_)
    path = cache_path()
    cache = json.loads(path.read_text()) if use_cache and path.exists() else {}
    if key in cache:
        return MosaicConfig(**cache[key])

    H = q.shape[-1]
    base = default_mosaic_config(head_dim=H, is_causal=is_causal, q_len=q.shape[1])
    fwd_candidates, bwd_candidates = candidates if candidates is not None else mosaic_candidates(H, base)
    d_out = jnp.ones_like(q)

    def clock(config, backward: bool) -> float:
        attn = lambda q, k, v: dot_product_attention(q, k, v, is_causal=is_causal, implementation="mosaic",
                                                     config=config)
        if backward:
            loss = lambda q, k, v: jnp.sum((attn(q, k, v) * d_out).astype(jnp.float32))
            fn, args = jax.jit(jax.grad(loss, argnums=(0, 1, 2))), (q, k, v)
        else:
            fn, args = jax.jit(attn), (q, k, v)
        return median_seconds(fn, args, rounds=rounds, calls=calls)

    def timed(config, backward: bool) -> float:
        try:
            seconds = (timer or clock)(config, backward)
        except Exception as err:  # noqa: BLE001 - a candidate that cannot compile is a result
            if verbose:
                print(f"{config}: {type(err).__name__}")
            return float("inf")
        if verbose:
            print(f"{config}: {seconds * 1e3:.3f} ms", flush=True)
        return seconds

    best = min(fwd_candidates or [base], key=lambda c: timed(c, backward=False))
    if pass_ == "fwdbwd":
        forward_tiles = dict(block_q=best.block_q, block_kv=best.block_kv, num_stages=best.num_stages)
        best = min([c.replace(**forward_tiles) for c in (bwd_candidates or [best])],
                   key=lambda c: timed(c, backward=True))
    if use_cache:
        cache[key] = dataclasses.asdict(best)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cache, indent=1, sort_keys=True))
    return best
