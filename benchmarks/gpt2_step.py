"""Time one jit-compiled GPT-2 small training step (AdamW, bf16 compute) per attention implementation.

    python benchmarks/gpt2_step.py --out gpt2_step.json            # H100: batch 8 x 1024
    python benchmarks/gpt2_step.py --tiny --out /tmp/smoke.json    # CPU smoke test, tiny config

All implementations run in one process from the same initial weights and batch: a warm-up (compile
plus a few steps), then the median of repeated steps, each timed to ``block_until_ready``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.gpt2 import GPT2, GPT2Config
from models.tokenizer import load_corpus
from models.train import batches, make_optimizer, make_train_step

IMPLEMENTATIONS = ("xla", "cudnn", "pallas_flash")


def time_step(config: GPT2Config, batch, *, warmup: int, iters: int, seed: int) -> dict:
    model = GPT2(config, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    del model
    tx = make_optimizer(6e-4, 1000)
    opt_state = tx.init(params)
    step = make_train_step(graphdef, tx)
    t0 = time.perf_counter()
    params, opt_state, loss, _ = step(params, opt_state, batch)
    first_loss = float(loss)
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        params, opt_state, loss, _ = step(params, opt_state, batch)
    jax.block_until_ready((params, opt_state))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        params, opt_state, loss, _ = step(params, opt_state, batch)
        jax.block_until_ready((params, opt_state, loss))
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    return dict(step_ms=step_s * 1e3, step_ms_min=min(times) * 1e3, step_ms_all=[t * 1e3 for t in times],
                tokens_per_s=batch.size / step_s, compile_s=compile_s, first_loss=first_loss,
                last_loss=float(loss))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="where to write the JSON results")
    p.add_argument("--tiny", action="store_true", help="tiny config, batch 2 x 64: a smoke test anywhere")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--fp32", action="store_true", help="float32 compute instead of bf16")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--impl", action="append", choices=IMPLEMENTATIONS,
                   help="repeatable; default: all of " + ", ".join(IMPLEMENTATIONS))
    args = p.parse_args(argv)

    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu and not args.tiny:
        sys.exit("gpt2_step: no GPU (jax backend is %r). GPT-2 small at 8 x 1024 is a GPU benchmark; "
                 "pass --tiny for a CPU smoke test." % jax.default_backend())
    batch_size = args.batch_size or (2 if args.tiny else 8)
    seq_len = args.seq_len or (64 if args.tiny else 1024)
    dtype = jnp.float32 if args.fp32 else jnp.bfloat16
    preset = GPT2Config.tiny if args.tiny else GPT2Config.small
    impls = args.impl or list(IMPLEMENTATIONS)
    batch = jnp.asarray(next(batches(load_corpus(), batch_size, seq_len, seed=0)))

    print(f"GPT-2 {'tiny' if args.tiny else 'small'} train step, batch {batch_size} x {seq_len}, "
          f"{jnp.dtype(dtype).name} compute, {jax.devices()[0].device_kind}, jax {jax.__version__}")
    results = {}
    for impl in impls:
        attention = impl
        if impl == "pallas_flash" and not on_gpu:
            attention = "pallas_flash:triton"  # else it would quietly run its pure-jnp path
        if impl == "cudnn" and not on_gpu:
            results[impl] = dict(error="skipped: cudnn needs a CUDA GPU")
            print(f"{impl:>14}: skipped (needs a CUDA GPU)")
            continue
        config = preset(attention=attention, dtype=dtype, n_positions=max(seq_len, preset().n_positions))
        try:
            results[impl] = time_step(config, batch, warmup=args.warmup, iters=args.iters, seed=0)
        except Exception as e:  # one failing implementation must not lose the others' numbers
            traceback.print_exc()
            results[impl] = dict(error=f"{type(e).__name__}: {e}")
        r = results[impl]
        if "error" in r:
            print(f"{impl:>14}: FAILED {r['error'][:200]}")
        else:
            print(f"{impl:>14}: {r['step_ms']:9.2f} ms/step  {r['tokens_per_s']:12,.0f} tokens/s  "
                  f"(compile {r['compile_s']:.1f} s, loss {r['first_loss']:.4f} -> {r['last_loss']:.4f})")

    ok = {k: v for k, v in results.items() if "error" not in v}
    print()
    print(f"{'attention':>14} | {'step (ms)':>10} | {'tokens/s':>12} | {'vs xla':>7}")
    print("-" * 54)
    for impl, r in results.items():
        if "error" in r:
            print(f"{impl:>14} | {'-':>10} | {'-':>12} | {'-':>7}")
            continue
        rel = f"{ok['xla']['step_ms'] / r['step_ms']:.2f}x" if "xla" in ok else "-"
        print(f"{impl:>14} | {r['step_ms']:10.2f} | {r['tokens_per_s']:12,.0f} | {rel:>7}")
    record = dict(benchmark="gpt2_step", config="tiny" if args.tiny else "small",
                  batch_size=batch_size, seq_len=seq_len, dtype=jnp.dtype(dtype).name,
                  warmup=args.warmup, iters=args.iters, device=jax.devices()[0].device_kind,
                  backend=jax.default_backend(), jax_version=jax.__version__,
                  python=platform.python_version(), results=results)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
