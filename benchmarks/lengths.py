"""Padded batches: per-row sequence lengths, our kernels against cuDNN and XLA in one process.

    python -m benchmarks.lengths [--shape 4,4096,16,128] [--min-fraction 0.25] [--out FILE.json]

At ``B x T x N x H`` bfloat16 (default 4x4096x16x128), each batch row valid up to a length drawn
uniformly from ``[min_fraction * T, T]`` (seed 0; the same length for queries and keys, as in a
padded self-attention batch), times the forward and the forward+backward (`jax.grad` of
``sum(out * cotangent)``), causal and not, of:

- ``mosaic``: `pallas_flash.dot_product_attention` with ``query_seq_lengths`` and
  ``key_value_seq_lengths`` on the Hopper kernels (they skip the tiles past each row's lengths);
- ``triton``: the same call on the Pallas Triton kernels;
- ``cudnn`` / ``xla``: `jax.nn.dot_product_attention` with the same lengths;
- ``mosaic, full rows``: our Hopper kernels without lengths, the work the lengths save.

All variants run in interleaved rounds (`pallas_flash.timing.interleaved_rounds`), medians
reported with each one's ratio to cuDNN's time. Without a GPU it prints "needs a GPU" and exits 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

import pallas_flash
from benchmarks.tune import no_gpu, random_inputs
from pallas_flash.timing import interleaved_rounds


def row_lengths(B: int, T: int, min_fraction: float, seed: int = 0) -> np.ndarray:
    """``B`` lengths drawn uniformly from ``[ceil(min_fraction * T), T]``."""
    low = max(1, int(np.ceil(min_fraction * T)))
    return np.random.default_rng(seed).integers(low, T + 1, size=B).astype(np.int32)


def variants(lengths, *, is_causal: bool):
    ours = lambda impl, lens: lambda q, k, v: pallas_flash.dot_product_attention(
        q, k, v, is_causal=is_causal, implementation=impl,
        query_seq_lengths=lens, key_value_seq_lengths=lens)
    theirs = lambda impl: lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=is_causal, implementation=impl,
        query_seq_lengths=lengths, key_value_seq_lengths=lengths)
    return {
        "mosaic": ours("mosaic", lengths),
        "triton": ours("triton", lengths),
        "cudnn": theirs("cudnn"),
        "xla": theirs("xla"),
        "mosaic, full rows": ours("mosaic", None),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="4,4096,16,128", help="B,T,N,H (default 4,4096,16,128)")
    parser.add_argument("--min-fraction", type=float, default=0.25,
                        help="shortest row as a fraction of T (default 0.25)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--out", help="write the medians here as JSON")
    args = parser.parse_args(argv)
    if no_gpu("lengths"):
        return 0

    B, T, N, H = (int(x) for x in args.shape.split(","))
    q, k, v, d_out = random_inputs(B, T, N, H)
    lengths = jnp.asarray(row_lengths(B, T, args.min_fraction))
    device = jax.devices()[0].device_kind
    results = dict(shape=[B, T, N, H], lengths=[int(x) for x in lengths], device=device, rows=[])
    for is_causal in (False, True):
        cases, names = [], []
        for name, fn in variants(lengths, is_causal=is_causal).items():
            # The cotangent is an argument: closed over, XLA would constant-fold it into the program.
            loss = lambda q, k, v, d_out, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32) * d_out.astype(jnp.float32))
            passes = (("fwd", jax.jit(fn), (q, k, v)),
                      ("fwd+bwd", jax.jit(jax.grad(loss, argnums=(0, 1, 2))), (q, k, v, d_out)))
            for pass_name, compiled, inputs in passes:
                try:
                    jax.block_until_ready(compiled(*inputs))
                except Exception as err:  # cuDNN may not take a shape, XLA may run out of memory
                    print(f"  {name} {pass_name}: {type(err).__name__}: {str(err).splitlines()[0][:80]}")
                    continue
                cases.append((compiled, inputs))
                names.append((name, pass_name))
        print(f"causal={is_causal}: timing {len(cases)} variants, {args.rounds} interleaved rounds", flush=True)
        times = interleaved_rounds(cases, rounds=args.rounds, calls=args.calls, warmup=1)
        medians = {key: statistics.median(t) for key, t in zip(names, times)}
        for (name, pass_name), seconds in medians.items():
            base = medians.get(("cudnn", pass_name))
            results["rows"].append({"causal": is_causal, "variant": name, "pass": pass_name, "ms": seconds * 1e3,
                                    "cudnn_over_this": None if base is None else base / seconds})

    print(f"\n{B}x{T}x{N}x{H} bfloat16, row lengths {results['lengths']}, {device}")
    print("| causal | pass | variant | ms | cuDNN time / this |")
    print("|---|---|---|---|---|")
    for row in results["rows"]:
        ratio = "—" if row["cudnn_over_this"] is None else f"{row['cudnn_over_this']:.3f}"
        print(f"| {'yes' if row['causal'] else 'no'} | {row['pass']} | {row['variant']} | {row['ms']:.3f} | {ratio} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
