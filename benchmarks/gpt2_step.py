"""Time one jit-compiled GPT-2 small training step (AdamW, bf16 compute) per attention implementation.

    python benchmarks/gpt2_step.py --out gpt2_step.json            # H100: batch 8 x 1024
    python benchmarks/gpt2_step.py --tiny --out /tmp/smoke.json    # CPU smoke test, tiny config

All implementations run in one process from the same initial weights and batch: each is compiled and
warmed up, then timed by `pallas_flash.timing.interleaved_rounds` (round r of every implementation
before round r + 1 of any: timed one after another, the first would get the coolest card). A round
is ``--calls`` steps dispatched back to back, each taking the state the previous one returned, and
waited on once; the step time is the median over rounds of its mean.
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
from pallas_flash.timing import interleaved_rounds

IMPLEMENTATIONS = ("xla", "cudnn", "pallas_flash")


class StepRunner:
    """One implementation's model, optimizer state and compiled step, advanced in place by
    `advance` (one step, whose outputs the next step takes)."""

    def __init__(self, config: GPT2Config, batch, *, seed: int):
        model = GPT2(config, rngs=nnx.Rngs(seed))
        graphdef, self.params = nnx.split(model)
        del model
        tx = make_optimizer(6e-4, 1000)
        self.opt_state = tx.init(self.params)
        self.step = make_train_step(graphdef, tx)
        self.batch = batch
        t0 = time.perf_counter()
        jax.block_until_ready(self.advance())
        self.first_loss = float(self.loss)
        self.compile_s = time.perf_counter() - t0

    def advance(self):
        """Dispatches one step on the current state; returns the new state, for waiting on."""
        self.params, self.opt_state, self.loss, _ = self.step(self.params, self.opt_state, self.batch)
        return self.params, self.opt_state, self.loss


def time_steps(runners: dict[str, StepRunner], *, warmup: int, rounds: int, calls: int) -> dict:
    times = interleaved_rounds([(runner.advance, ()) for runner in runners.values()], rounds=rounds,
                               calls=calls, warmup=warmup)
    per_round = dict(zip(runners, times))
    results = {}
    for impl, runner in runners.items():
        step_s = float(np.median(per_round[impl]))
        results[impl] = dict(step_ms=step_s * 1e3, step_ms_min=min(per_round[impl]) * 1e3,
                             step_ms_rounds=[t * 1e3 for t in per_round[impl]],
                             tokens_per_s=runner.batch[:, 1:].size / step_s, compile_s=runner.compile_s,
                             first_loss=runner.first_loss, last_loss=float(runner.loss))
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="where to write the JSON results")
    p.add_argument("--tiny", action="store_true", help="tiny config, batch 2 x 64: a smoke test anywhere")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--fp32", action="store_true", help="float32 compute instead of bf16")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per implementation after compiling")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timed rounds (median taken)")
    p.add_argument("--calls", type=int, default=5, help="steps per round, dispatched back to back")
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
    results, runners = {}, {}
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
            runners[impl] = StepRunner(config, batch, seed=0)
        except Exception as e:  # one failing implementation must not lose the others' numbers
            traceback.print_exc()
            results[impl] = dict(error=f"{type(e).__name__}: {e}")
            print(f"{impl:>14}: FAILED {results[impl]['error'][:200]}")
            continue
        print(f"{impl:>14}: compiled in {runners[impl].compile_s:.1f} s", flush=True)
    print(f"timing: {args.warmup} warm-up steps each, then {args.rounds} interleaved rounds of {args.calls} steps",
          flush=True)
    results.update(time_steps(runners, warmup=args.warmup, rounds=args.rounds, calls=args.calls))
    results = {impl: results[impl] for impl in impls}
    for impl, r in results.items():
        if "error" not in r:
            print(f"{impl:>14}: {r['step_ms']:9.2f} ms/step (min {r['step_ms_min']:.2f})  "
                  f"{r['tokens_per_s']:12,.0f} tokens/s  (loss {r['first_loss']:.4f} -> {r['last_loss']:.4f})")

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
                  warmup=args.warmup, rounds=args.rounds, calls=args.calls, device=jax.devices()[0].device_kind,
                  backend=jax.default_backend(), jax_version=jax.__version__,
                  python=platform.python_version(), results=results)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
