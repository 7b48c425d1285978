"""Autoregressive generation for `models.gpt2.GPT2`: KV-cached or full-recompute, greedy or sampled.

    python -m models.generate --prompt "The river" --max-new-tokens 200 --temperature 0.8 --top-k 40

(random weights unless --checkpoint points at an HF GPT-2 directory; trained tiny weights come from
``python -m models.train --save DIR``.)
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.gpt2 import GPT2, GPT2Config, KVCache


def sample(logits, rng, *, temperature: float, top_k: int | None):
    """Next tokens ``[B]`` from logits ``[B, V]``: argmax when temperature is 0."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1], the k-th largest logit
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _rows(x):
    return jnp.arange(x.shape[0])


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k",
                                             "use_cache"))
def _generate(graphdef, state, prompts, prompt_lengths, rng, *, max_new_tokens, temperature, top_k,
              use_cache):
    model = nnx.merge(graphdef, state)
    B, T0 = prompts.shape
    total = T0 + max_new_tokens
    # Row b holds its prompt in [0, prompt_lengths[b]) then its generated tokens; zeros elsewhere.
    buf = jnp.zeros((B, total), jnp.int32)
    buf = buf.at[:, :T0].set(jnp.where(jnp.arange(T0) < prompt_lengths[:, None], prompts, 0))

    if use_cache:
        logits, cache = model(prompts, cache=KVCache.empty(model.config, B, total))
        # Padding past a row's prompt was cached too; rewinding the length makes it stale, and the
        # generated tokens overwrite it.
        cache = cache._replace(lengths=prompt_lengths)
    else:
        logits, cache = model(buf), None
    last = logits[_rows(buf), prompt_lengths - 1]  # [B, V]

    def step(i, carry):
        buf, cache, last, all_logits, rng = carry
        rng, sub = jax.random.split(rng)
        token = sample(last, sub, temperature=temperature, top_k=top_k)  # [B]
        all_logits = all_logits.at[:, i].set(last)
        pos = prompt_lengths + i
        buf = buf.at[_rows(buf), pos].set(token)
        if use_cache:
            logits, cache = model(token[:, None], cache=cache)  # [B, 1, V]
            last = logits[:, 0]
        else:
            # Causal attention makes the zeros past `pos` invisible to it.
            last = model(buf)[_rows(buf), pos]
        return buf, cache, last, all_logits, rng

    all_logits = jnp.zeros((B, max_new_tokens, last.shape[-1]), jnp.float32)
    buf, _, _, all_logits, _ = jax.lax.fori_loop(0, max_new_tokens, step,
                                                 (buf, cache, last, all_logits, rng))
    return buf, all_logits


def generate(model: GPT2, prompts, *, max_new_tokens: int, prompt_lengths=None,
             temperature: float = 0.0, top_k: int | None = None, rng=None, use_cache: bool = True,
             return_logits: bool = False):
    """Continues each prompt by ``max_new_tokens`` tokens.

    Args:
      model: a `GPT2`.
      prompts: ``[B, T0]`` int token ids, right-padded when rows differ in length.
      max_new_tokens: tokens to generate per row (>= 1).
      prompt_lengths: ``[B]`` valid prompt lengths (1..T0); all T0 when None.
      temperature: 0 for greedy decoding, else the softmax temperature of sampling.
      top_k: sample among the k most likely tokens only (None: all).
      rng: a `jax.random.key`, required when sampling.
      use_cache: decode with the KV cache (one new token per step) or recompute the whole prefix.
      return_logits: also return the ``[B, max_new_tokens, V]`` logits each token was drawn from.

    Returns:
      ``[B, T0 + max_new_tokens]`` int32: row b's prompt, then its new tokens from position
      ``prompt_lengths[b]``, then zeros. With ``return_logits``, ``(tokens, logits)``.
    """
    prompts = jnp.asarray(prompts)
    if prompts.ndim != 2 or not jnp.issubdtype(prompts.dtype, jnp.integer):
        raise ValueError(f"prompts must be an integer [B, T0] array, got {prompts.dtype}{prompts.shape}")
    B, T0 = prompts.shape
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if T0 + max_new_tokens > model.config.n_positions:
        raise ValueError(f"prompt length {T0} + max_new_tokens {max_new_tokens} exceeds the model's "
                         f"n_positions={model.config.n_positions}")
    lengths = np.full((B,), T0) if prompt_lengths is None else np.asarray(prompt_lengths)
    if lengths.shape != (B,) or lengths.min() < 1 or lengths.max() > T0:
        raise ValueError(f"prompt_lengths must be [B]=[{B}] values in [1, {T0}], got {lengths}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and not 1 <= top_k <= model.config.vocab_size:
        raise ValueError(f"top_k must be in [1, vocab_size={model.config.vocab_size}], got {top_k}")
    if temperature > 0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs an rng key")
    rng = jax.random.key(0) if rng is None else rng
    graphdef, state = nnx.split(model)
    tokens, logits = _generate(graphdef, state, prompts.astype(jnp.int32),
                               jnp.asarray(lengths, jnp.int32), rng, max_new_tokens=max_new_tokens,
                               temperature=float(temperature), top_k=top_k, use_cache=use_cache)
    return (tokens, logits) if return_logits else tokens


def main(argv=None):
    from models.gpt2 import load_hf_gpt2
    from models.tokenizer import ByteTokenizer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", default="The river")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attention", default="xla")
    p.add_argument("--checkpoint", help="a directory with config.json + model.safetensors (HF layout); "
                                        "its vocabulary must be bytes (e.g. saved by models.train)")
    p.add_argument("--no-cache", action="store_true", help="recompute the prefix at every step")
    args = p.parse_args(argv)
    if args.checkpoint:
        model = load_hf_gpt2(args.checkpoint, attention=args.attention)
    else:
        print("(no --checkpoint: random weights, expect noise)")
        model = GPT2(GPT2Config.tiny(attention=args.attention), rngs=nnx.Rngs(args.seed))
    tok = ByteTokenizer()
    prompt = tok.encode(args.prompt)[None]
    out = generate(model, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, rng=jax.random.key(args.seed), use_cache=not args.no_cache)
    print(tok.decode(np.asarray(out[0])))


if __name__ == "__main__":
    main()
