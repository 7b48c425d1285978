"""Train GPT-2 on the shipped byte-level corpus with a jit-compiled AdamW step.

    python -m models.train --attention pallas_flash --compare      # also train with xla, compare
    python -m models.train --config small --bf16 --steps 200       # GPT-2 small on a GPU

Without a GPU the defaults shrink to the tiny config and a few steps, and ``pallas_flash`` runs its
Pallas kernel in interpret mode (``pallas_flash:triton``) so the kernel is what gets exercised.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from models.gpt2 import ATTENTIONS, GPT2, GPT2Config, save_hf_gpt2
from models.tokenizer import load_corpus


def make_optimizer(lr: float, steps: int, *, weight_decay: float = 0.1, clip: float = 1.0):
    """AdamW with linear warm-up, cosine decay and global-norm clipping; no decay on biases/norms."""
    warmup = max(1, min(100, steps // 10))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr / 10)
    return optax.chain(
        optax.clip_by_global_norm(clip),
        optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=weight_decay,
                    mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)),
    )


def loss_fn(model: GPT2, batch):
    """Mean next-token cross-entropy of ``batch [B, T + 1]``."""
    logits = model(batch[:, :-1])  # [B, T, V] float32
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def make_train_step(graphdef, tx):
    """``step(params, opt_state, batch) -> (params, opt_state, loss, grad_norm)``, jitted and donating."""

    def pure_loss(params, batch):
        return loss_fn(nnx.merge(graphdef, params), batch)

    # Donating params and optimizer state lets XLA update them in place (GPT-2 small: ~1.5 GB).
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(pure_loss)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, optax.tree.norm(grads)

    return step


def batches(data: np.ndarray, batch_size: int, seq_len: int, seed: int):
    """Endless random windows ``[batch_size, seq_len + 1]`` of the token stream (same for a seed)."""
    if len(data) < seq_len + 2:
        raise ValueError(f"corpus of {len(data)} tokens is too short for seq_len={seq_len}")
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(data) - seq_len - 1, size=batch_size)
        yield np.stack([data[s:s + seq_len + 1] for s in starts]).astype(np.int32)


class Progress:
    """A one-line stdout progress bar (redrawn in place on a terminal, a line per update otherwise)."""

    def __init__(self, total: int, label: str, width: int = 24):
        self.total, self.label, self.width = total, label, width
        self.tty = sys.stdout.isatty()

    def update(self, step: int, text: str):
        done = int(self.width * step / self.total)
        line = f"{self.label} [{'#' * done}{'.' * (self.width - done)}] {step}/{self.total} {text}"
        if self.tty:
            sys.stdout.write("\r" + line)
            if step == self.total:
                sys.stdout.write("\n")
        else:
            sys.stdout.write(line + "\n")
        sys.stdout.flush()


@dataclasses.dataclass
class RunResult:
    attention: str
    losses: list[float]
    compile_s: float
    step_s: float  # median over post-compile steps
    tokens_per_s: float
    model: GPT2 | None = None


def train(config: GPT2Config, *, steps: int, batch_size: int, seq_len: int, lr: float, seed: int = 0,
          log_every: int = 1, data: np.ndarray | None = None, quiet: bool = False) -> RunResult:
    """Trains a fresh model (init from ``seed``) and returns the loss curve and throughput."""
    if seq_len > config.n_positions:
        raise ValueError(f"seq_len={seq_len} exceeds n_positions={config.n_positions}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    data = load_corpus() if data is None else data
    if data.max() >= config.vocab_size:
        raise ValueError(f"token id {data.max()} does not fit vocab_size={config.vocab_size}")
    model = GPT2(config, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    tx = make_optimizer(lr, steps)
    opt_state = tx.init(params)
    step_fn = make_train_step(graphdef, tx)
    stream = batches(data, batch_size, seq_len, seed)
    progress = None if quiet else Progress(steps, f"{config.attention:>20}")
    losses, times = [], []
    compile_s = 0.0
    for i in range(1, steps + 1):
        batch = jnp.asarray(next(stream))
        t0 = time.perf_counter()
        params, opt_state, loss, grad_norm = step_fn(params, opt_state, batch)
        loss = float(loss)  # blocks until the step is done
        dt = time.perf_counter() - t0
        if i == 1:
            compile_s = dt
        else:
            times.append(dt)
        losses.append(loss)
        if progress is not None and (i % log_every == 0 or i == steps):
            step_s = float(np.median(times)) if times else dt
            progress.update(i, f"loss {loss:.4f} |g| {float(grad_norm):.3f} "
                               f"{batch_size * seq_len / step_s:,.0f} tok/s")
    step_s = float(np.median(times)) if times else compile_s
    return RunResult(config.attention, losses, compile_s, step_s, batch_size * seq_len / step_s,
                     nnx.merge(graphdef, params))


def default_attention_impl(attention: str) -> str:
    """``pallas_flash`` off-GPU would silently run its pure-jnp path; run the kernel (interpreted)."""
    if attention == "pallas_flash" and jax.default_backend() != "gpu":
        return "pallas_flash:triton"
    return attention


def main(argv=None):
    on_gpu = jax.default_backend() == "gpu"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attention", default="pallas_flash", choices=ATTENTIONS)
    p.add_argument("--config", choices=("tiny", "small"), default="small" if on_gpu else "tiny")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024 if on_gpu else 64)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default by config)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 compute (float32 params/optimizer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=None,
                   help="steps between progress updates (default: every step on a terminal)")
    p.add_argument("--compare", action="store_true",
                   help="also train with attention='xla' from the same init and batches")
    p.add_argument("--save", metavar="DIR", help="write the trained model in HF GPT-2 layout")
    args = p.parse_args(argv)

    preset = GPT2Config.tiny if args.config == "tiny" else GPT2Config.small
    attention = default_attention_impl(args.attention)
    dtype = jnp.bfloat16 if args.bf16 else jnp.float32
    lr = args.lr if args.lr is not None else (1e-3 if args.config == "tiny" else 6e-4)
    config = preset(attention=attention, dtype=dtype,
                    n_positions=max(preset().n_positions, args.seq_len))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(nnx.eval_shape(
        lambda: GPT2(config, rngs=nnx.Rngs(0))))))
    print(f"GPT-2 {args.config} ({n_params / 1e6:.2f}M params), {jax.default_backend()} backend, "
          f"batch {args.batch_size} x {args.seq_len}, {args.steps} steps, "
          f"{'bf16' if args.bf16 else 'fp32'} compute, lr {lr}")
    if attention != args.attention:
        print(f"no GPU: using {attention} (the Pallas kernel in interpret mode; slow, for checking)")

    log_every = args.log_every or (1 if sys.stdout.isatty() else max(1, args.steps // 20))
    run = dict(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=lr,
               seed=args.seed, log_every=log_every)
    main_run = train(config, **run)
    print(f"{attention}: final loss {main_run.losses[-1]:.4f} (from {main_run.losses[0]:.4f}), "
          f"{main_run.step_s * 1e3:.1f} ms/step, {main_run.tokens_per_s:,.0f} tokens/s, "
          f"first step (compile) {main_run.compile_s:.1f} s")
    if args.save:
        save_hf_gpt2(main_run.model, args.save)
        print(f"saved to {args.save}")
    if args.compare and attention != "xla":
        ref = train(config.replace(attention="xla"), **run)
        diff = max(abs(a - b) for a, b in zip(main_run.losses, ref.losses))
        print(f"compare: {attention} vs xla | final loss {main_run.losses[-1]:.4f} vs "
              f"{ref.losses[-1]:.4f} | max |loss diff| over {args.steps} steps {diff:.2e} | "
              f"{main_run.step_s * 1e3:.1f} vs {ref.step_s * 1e3:.1f} ms/step | "
              f"{main_run.tokens_per_s:,.0f} vs {ref.tokens_per_s:,.0f} tokens/s "
              f"(speed-up {ref.step_s / main_run.step_s:.2f}x)")
        if not math.isfinite(diff):
            sys.exit("loss curves are not finite")


if __name__ == "__main__":
    main()
