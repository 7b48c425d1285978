"""Where the Mosaic GPU backward's time goes: each of its kernels timed alone.

    python -m benchmarks.backward_parts --shapes 4,4096,16,128 1,16384,16,128 --out parts.json

For each B,S,N,H shape and causal setting this times, in one process with the rounds interleaved
(`pallas_flash.timing.interleaved_rounds`): the forward, the whole backward (`mosaic_backward` from
the forward's residuals), the backward with the dQ kernel's launch replaced by zeros ("dK/dV
alone"), with the dK/dV launch replaced ("dQ alone") and with both replaced ("shared": the XLA work
the kernels share, delta and padding, which both "alone" times include). TFLOP/s count the
products each part issues per tile pair: two in the forward, four in the dK/dV kernel, three in
the dQ kernel (seven in the backward, whose "convention" rate uses FlashAttention's five); above
head dim 128 the dK/dV kernel is the "split" one (`mosaic_backward`), with the same product counts.
It always times the two-kernel backward: where the default fuses dQ into the dK/dV kernel
(`MosaicConfig.fuse_dq`, non-causal from 16k rows), there is no dQ launch to swap, so it is
turned off here.

The launches are swapped by patching `mosaic_backward.launch` inside this process, so the library
carries no switch for it. Without a GPU it runs a tiny interpret-mode case as a smoke test.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import sys

import jax
import jax.numpy as jnp

from pallas_flash import default_mosaic_config
from pallas_flash import mosaic_backward as mb
from pallas_flash.config import MosaicStatics, splits_backward
from pallas_flash.mosaic_forward import mosaic_forward
from pallas_flash.timing import interleaved_rounds

PARTS = ("backward", "dkdv_alone", "dq_alone", "shared")


def skipped_kernels(head_dim: int) -> dict[str, tuple[str, ...]]:
    """Per part, the names `mosaic_backward` gives the launches that part swaps out."""
    dkv = "pallas_flash_mosaic_" + ("split" if splits_backward(head_dim) else "dkdv")
    dq = "pallas_flash_mosaic_dq"
    return dict(zip(PARTS, ((), (dq,), (dkv,), (dq, dkv))))


@contextlib.contextmanager
def without_kernels(skipped: tuple[str, ...]):
    """Inside, `mosaic_backward`'s launches of the kernels named in ``skipped`` return zeros of their
    output types."""
    real = mb.launch

    def launch(body, *, out_type, name: str, **kwargs):
        if name not in skipped:
            return real(body, out_type=out_type, name=name, **kwargs)
        many = isinstance(out_type, (list, tuple))
        zeros = [jnp.zeros(o.shape, o.dtype) for o in (out_type if many else [out_type])]
        return lambda *args: zeros if many else zeros[0]

    mb.launch = launch
    try:
        yield
    finally:
        mb.launch = real


def backward_fns(q, k, v, d_out, *, statics: MosaicStatics):
    """(forward fn and args, {part: (jitted backward with that part's kernels swapped, args)})."""
    fwd = jax.jit(functools.partial(mosaic_forward, statics=statics))
    out, lse = fwd(q, k, v)
    parts = {}
    for part, skipped in skipped_kernels(statics.head_dim_padded).items():
        with without_kernels(skipped):
            fn = jax.jit(functools.partial(mb.mosaic_backward, statics=statics))
            args = (q, k, v, out, lse, d_out)
            jax.block_until_ready(fn(*args))  # traced (and compiled) while the patch is in place
        parts[part] = (fn, args)
    return (fwd, (q, k, v)), parts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["4,4096,16,128", "1,16384,16,128", "4,4096,16,64"],
                        help="B,S,N,H (T = S, K = N)")
    parser.add_argument("--causal", choices=("yes", "no", "both"), default="both")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--out", default=None, help="JSON file for the rows")
    args = parser.parse_args(argv)
    interpret = jax.default_backend() != "gpu"
    if interpret:
        print("No GPU: one tiny interpret-mode case, timings meaningless.", flush=True)
        args.shapes, args.rounds, args.calls = ["1,128,1,64"], 1, 1
    rows = []
    for shape in args.shapes:
        B, S, N, H = map(int, shape.split(","))
        for causal in {"yes": [True], "no": [False], "both": [False, True]}[args.causal]:
            config = default_mosaic_config(head_dim=H, is_causal=causal, q_len=S).replace(fuse_dq=False)
            statics = MosaicStatics(config=config,
                                    scale=H ** -0.5, is_causal=causal, q_len=S, kv_len=S, head_dim=H, groups=1,
                                    interpret=interpret)
            keys = jax.random.split(jax.random.key(0), 4)
            q, k, v, d_out = (jax.random.normal(key, (B, S, N, H), jnp.bfloat16) for key in keys)
            forward, parts = backward_fns(q, k, v, d_out, statics=statics)
            times = interleaved_rounds([forward, *parts.values()], rounds=args.rounds, calls=args.calls)
            ms = dict(zip(["forward", *parts], (statistics.median(t) * 1e3 for t in times)))
            product = 2.0 * B * N * S * S * H * (0.5 if causal else 1.0)  # one matmul's flops
            issued = dict(forward=2, backward=7, dkdv_alone=4, dq_alone=3, shared=0)
            tflops = {p: issued[p] * product / (t * 1e-3) / 1e12 for p, t in ms.items()}
            row = dict(shape=[B, S, N, H], causal=causal, ms=ms, issued_tflops=tflops,
                       backward_convention_tflops=5 * product / (ms["backward"] * 1e-3) / 1e12)
            rows.append(row)
            print(f"{shape} causal={causal!s:5} " + " | ".join(
                f"{p} {ms[p]:.3f} ms ({tflops[p]:.0f})" for p in ms) +
                f" | backward {row['backward_convention_tflops']:.0f} TFLOP/s by convention", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
