"""Packed sequences: segment ids against the same attention as an explicit mask, and plain causal.

    python -m benchmarks.segments [--shape 4,4096,16,128] [--docs 4]

At ``B x T x N x H`` bfloat16 (default 4x4096x16x128), causal, times the forward and
forward+backward (`jax.grad` of ``sum(out * cotangent)``) of:

(a) ``segment_ids``: `pallas_flash.dot_product_attention` with query/key segment ids, ``--docs``
    documents per row at random boundaries (the kernel skips the block pairs of different documents);
(b) ``mask``: the same visibility as an explicit boolean ``[B, 1, T, T]`` mask array, also through
    our kernel (``implementation="triton"``): it reads the mask tile by tile but can skip only the
    blocks that causality rules out, and no tile runs mask-free;
(c) ``causal``: plain causal attention over the whole row with our kernel (no segments), the
    ceiling that (a) should beat by skipping cross-document blocks.

Timing is `pallas_flash.timing.median_seconds` (median of rounds of back-to-back calls). Without a
GPU it prints "needs a GPU" and exits 0.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

import pallas_flash
from benchmarks.tune import no_gpu, random_inputs
from pallas_flash.timing import median_seconds


def packed_segment_ids(rng: np.random.Generator, B: int, T: int, docs: int) -> np.ndarray:
    """Non-decreasing ids: ``docs`` documents per row with random boundaries."""
    ids = np.zeros((B, T), np.int32)
    for b in range(B):
        for cut in rng.choice(np.arange(1, T), size=docs - 1, replace=False):
            ids[b, cut:] += 1
    return ids


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="4,4096,16,128", help="B,T,N,H (default 4,4096,16,128)")
    parser.add_argument("--docs", type=int, default=4, help="documents per row (default 4)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=10)
    args = parser.parse_args(argv)
    if no_gpu("segments"):
        return 0

    B, T, N, H = (int(x) for x in args.shape.split(","))
    q, k, v, d_out = random_inputs(B, T, N, H)
    ids = jnp.asarray(packed_segment_ids(np.random.default_rng(0), B, T, args.docs))
    causal = np.tril(np.ones((T, T), bool))
    mask = jnp.asarray((np.asarray(ids)[:, :, None] == np.asarray(ids)[:, None, :]) & causal)[:, None]

    # The ids, the mask and the cotangent are arguments: closed over, XLA would constant-fold them
    # into each program (the mask alone is B * T * T bytes).
    variants = {
        "segment_ids (pallas_flash triton)": lambda q, k, v, ids, mask: pallas_flash.dot_product_attention(
            q, k, v, is_causal=True, query_segment_ids=ids, key_value_segment_ids=ids,
            implementation="triton"),
        "mask array (pallas_flash triton)": lambda q, k, v, ids, mask: pallas_flash.dot_product_attention(
            q, k, v, mask=mask, is_causal=True, implementation="triton"),
        "causal, full row (pallas_flash triton)": lambda q, k, v, ids, mask: pallas_flash.dot_product_attention(
            q, k, v, is_causal=True, implementation="triton"),
    }
    timed = lambda f, *xs: median_seconds(f, xs, rounds=args.rounds, calls=args.calls)
    rows = []
    for name, fn in variants.items():
        loss = lambda q, k, v, ids, mask, d_out, fn=fn: jnp.sum(
            fn(q, k, v, ids, mask).astype(jnp.float32) * d_out.astype(jnp.float32))
        fwdbwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        try:
            t_fwd = timed(jax.jit(fn), q, k, v, ids, mask)
            t_bwd = timed(fwdbwd, q, k, v, ids, mask, d_out)
            rows.append((name, f"{t_fwd * 1e3:.3f}", f"{t_bwd * 1e3:.3f}"))
        except Exception as err:  # out of memory, say: report it and go on to the next variant
            rows.append((name, "failed", f"{type(err).__name__}: {str(err).splitlines()[0][:60]}"))

    print(f"\n{B}x{T}x{N}x{H} bfloat16, causal, {args.docs} documents per row, "
          f"{jax.devices()[0].device_kind}")
    header = ("variant", "fwd ms", "fwd+bwd ms")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
