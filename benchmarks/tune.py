"""Block-size tuning for the Pallas kernels: times candidate configs on your GPU.

    python -m benchmarks.tune --shape 4,4096,16,128 --causal both --out tune.json
    python -m benchmarks.tune --impl mosaic --shape 4,4096,16,128 --sweep --baselines

Each candidate is timed for the forward and for forward+backward (median of rounds of back-to-back
calls, as in `benchmarks.attention`, the rounds of all candidates and baselines of one pass
interleaved so clock drift favours none); the fastest is printed as a ready `FlashConfig(...)` to pass
as ``dot_product_attention(..., config=...)``, and all results go to the JSON file. Candidates that
fail to compile (too much shared memory, say) are reported and skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import statistics
import sys

import jax
import jax.numpy as jnp

import pallas_flash
from pallas_flash.timing import interleaved_rounds
from pallas_flash import FlashConfig, default_config, default_mosaic_config
from pallas_flash.autotune import mosaic_candidates
from benchmarks.attention import tokamax_module


def attention_flops(B, T, S, N, H, causal, passes) -> float:
    flops = 4.0 * B * N * T * S * H * (0.5 if causal else 1.0)
    return flops * (3.5 if passes == "fwdbwd" else 1.0)


def random_inputs(B, T, N, H, dtype=jnp.bfloat16):
    """``q, k, v`` and a cotangent, ``[B, T, N, H]`` standard normals (float32 draws from key 0) in
    ``dtype``: the same inputs in every benchmark that times one shape."""
    keys = jax.random.split(jax.random.key(0), 4)
    return tuple(jax.random.normal(key, (B, T, N, H), jnp.float32).astype(dtype) for key in keys)


def no_gpu(module: str) -> bool:
    """True, after saying so, where there is no GPU to time ``benchmarks.<module>`` on."""
    if jax.default_backend() == "gpu":
        return False
    print(f"needs a GPU: benchmarks.{module} times compiled kernels; nothing to do on {jax.default_backend()}")
    return True


def make_fns(attn):
    fwd = jax.jit(attn)

    def loss(q, k, v, d_out):
        return jnp.sum(attn(q, k, v).astype(jnp.float32) * d_out.astype(jnp.float32))

    return fwd, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def baseline_fn(impl: str, causal: bool):
    """``f(q, k, v)`` for a baseline: jax.nn's ``xla`` or ``cudnn``, our ``triton`` kernels, or
    ``tokamax`` (its Mosaic GPU kernel, asked for by name so a fallback cannot stand in for it)."""
    if impl == "triton":
        return functools.partial(pallas_flash.dot_product_attention, is_causal=causal, implementation="triton")
    if impl == "tokamax":
        tokamax = tokamax_module()
        if tokamax is None:
            raise ValueError("--baseline-impls tokamax: tokamax is not importable (see benchmarks/README.md)")
        return functools.partial(tokamax.dot_product_attention, is_causal=causal, implementation="mosaic")
    return functools.partial(jax.nn.dot_product_attention, is_causal=causal, implementation=impl)


def candidates(head_dim: int, base: FlashConfig):
    """A small grid around the heuristic default: forward and backward knobs vary separately."""
    fwd = [dict(block_q=bq, block_k=bk, num_warps=w, num_stages=s)
           for bq, bk, w, s in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3))
           if not (head_dim > 128 and bk > 64)]
    # (block_q_dkv, block_k_dkv, block_q_dq, block_k_dq): the resident tile is the dK/dV kernel's K
    # slab and the dQ kernel's Q tile, whose float32 accumulators must stay in registers.
    tiles = (((32, 64, 64, 32), (64, 128, 128, 64), (32, 128, 128, 32), (64, 64, 64, 64)) if head_dim <= 128
             else ((16, 32, 32, 16), (32, 32, 32, 32), (32, 64, 64, 32), (16, 64, 64, 16)))
    bwd = [dict(block_q_dkv=a, block_k_dkv=b, block_q_dq=c, block_k_dq=d, num_warps_bwd=w, num_stages_bwd=s)
           for (a, b, c, d), w, s in itertools.product(tiles, (4, 8), (1, 2))]
    return [base.replace(**c) for c in fwd], [base.replace(**c) for c in bwd]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="4,4096,16,128", help="B,S,N,H (T = S, K = N)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--causal", choices=("yes", "no", "both"), default="both")
    parser.add_argument("--passes", default="fwd,fwdbwd")
    parser.add_argument("--baselines", action="store_true", help="also time jax.nn xla and cudnn")
    parser.add_argument("--sweep", action="store_true", help="time the candidate grid, not only the default")
    parser.add_argument("--baseline-impls", default=None,
                        help="comma list for --baselines from xla, cudnn, triton, tokamax (default: xla,cudnn, "
                             "plus triton with --impl mosaic)")
    parser.add_argument("--impl", choices=("triton", "mosaic"), default="triton",
                        help="which Pallas kernels to tune (mosaic: Hopper only)")
    parser.add_argument("--configs", default=None,
                        help="JSON list of config overrides to time instead of the default, e.g. "
                             "'[{}, {\"overlap_softmax\": true}]' ({} is the default itself)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per candidate (median taken)")
    parser.add_argument("--calls", type=int, default=10, help="back-to-back calls per round")
    parser.add_argument("--out", default=None, help="JSON file for all results")
    args = parser.parse_args(argv)
    if jax.default_backend() != "gpu":
        print("No GPU present: tuning needs a GPU.")
        return 0

    B, S, N, H = map(int, args.shape.split(","))
    dtype = jnp.dtype(args.dtype)
    q, k, v, d_out = random_inputs(B, S, N, H, dtype)
    causal_values = {"yes": [True], "no": [False], "both": [False, True]}[args.causal]
    passes = args.passes.split(",")
    if args.impl == "mosaic":
        default = lambda causal: default_mosaic_config(head_dim=H, is_causal=causal, q_len=S)
        grid = mosaic_candidates
    else:
        default = lambda causal: default_config(q_len=S, kv_len=S, head_dim=H, dtype_bytes=dtype.itemsize)
        grid = candidates
    overrides = json.loads(args.configs) if args.configs else None
    results = []

    def pass_fn(pass_name, fns):
        fwd, grad = fns
        return (fwd, (q, k, v)) if pass_name == "fwd" else (grad, (q, k, v, d_out))

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, shape=[B, S, N, H],
                               dtype=str(dtype), results=results), f, indent=1)

    def run_jobs(causal, pass_name, jobs):
        """Compiles each (label, fn, fn_args, config), then times the ones that ran with their
        rounds interleaved (`interleaved_rounds`); returns the rows."""
        ready, rows = [], []
        for label, fn, fn_args, config in jobs:
            row = dict(impl=label, causal=causal, passes=pass_name, ms=None, tflops=None, status="ok",
                       config=None if config is None else dataclasses.asdict(config))
            try:
                jax.block_until_ready(fn(*fn_args))
                ready.append((row, fn, fn_args))
            except Exception as err:  # noqa: BLE001 - a failing candidate is a result, not a crash
                row["status"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
            rows.append(row)
        times = interleaved_rounds([(fn, fn_args) for _, fn, fn_args in ready], rounds=args.rounds, calls=args.calls)
        for (row, _, _), per_call in zip(ready, times):
            seconds = statistics.median(per_call)
            row.update(ms=seconds * 1e3, tflops=attention_flops(B, S, S, N, H, causal, pass_name) / seconds / 1e12)
        for row in rows:
            shown = f"{row['ms']:.3f} ms {row['tflops']:6.1f} TFLOP/s" if row["ms"] else row["status"]
            print(f"{row['impl']:>14} causal={causal!s:5} {pass_name:6} {shown}", flush=True)
        results.extend(rows)
        save()
        return rows

    for causal in causal_values:
        base = default(causal)
        if overrides is not None:
            configs_fwd = configs_bwd = [base.replace(**o) for o in overrides]
        else:
            configs_fwd, configs_bwd = grid(H, base) if args.sweep else ([base], [base])
        impls = []
        if args.baselines:
            impls = (args.baseline_impls.split(",") if args.baseline_impls else
                     ["xla", "cudnn"] + (["triton"] if args.impl == "mosaic" else []))
        for pass_name, configs in (("fwd", configs_fwd), ("fwdbwd", configs_bwd)):
            if pass_name not in passes:
                continue
            jobs = []
            for impl in impls:
                jobs.append((impl, *pass_fn(pass_name, make_fns(baseline_fn(impl, causal))), None))
            for config in configs:
                fns = make_fns(lambda q, k, v, config=config: pallas_flash.dot_product_attention(
                    q, k, v, is_causal=causal, implementation=args.impl, config=config))
                jobs.append((args.impl, *pass_fn(pass_name, fns), config))
            timed = [r for r in run_jobs(causal, pass_name, jobs) if r["config"] is not None and r["ms"]]
            if timed:
                best = min(timed, key=lambda r: r["ms"])
                print(f"best {pass_name} causal={causal}: {best['ms']:.3f} ms  {best['config']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
