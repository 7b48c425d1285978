"""GPT-2 in Flax NNX, parameter-compatible with Hugging Face GPT-2 checkpoints.

The module tree mirrors HF's ``GPT2Model`` (``wte``, ``wpe``, ``h.{i}.ln_1``, ``h.{i}.attn.c_attn``,
``h.{i}.attn.c_proj``, ``h.{i}.ln_2``, ``h.{i}.mlp.c_fc``, ``h.{i}.mlp.c_proj``, ``ln_f``), HF's
Conv1D weights are ``[in, out]`` exactly like ``nnx.Linear`` kernels, and the LM head is tied to
``wte``, so a checkpoint loads by renaming only (`load_hf_gpt2`).

The attention implementation is a config field:

* ``"xla"``: ``jax.nn.dot_product_attention(implementation="xla")``;
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (CUDA GPU, fp16/bf16);
* ``"pallas_flash"``: ``pallas_flash.dot_product_attention(implementation=None)`` -- the Pallas
  kernel on a GPU, its pure-jnp path elsewhere; ``"pallas_flash:triton"`` / ``"pallas_flash:xla"``
  force one of its implementations (``:triton`` on CPU runs the kernel in interpret mode).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pallas_flash

ATTENTIONS = ("xla", "cudnn", "pallas_flash", "pallas_flash:triton", "pallas_flash:xla")


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Hyper-parameters (HF ``config.json`` names) plus the attention choice and compute dtype."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_epsilon: float = 1e-5
    attention: str = "xla"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPT2Config.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        # Normalised so that "bfloat16", jnp.bfloat16 and np.dtype("bfloat16") compare (and hash) equal.
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def replace(self, **changes) -> "GPT2Config":
        return dataclasses.replace(self, **changes)

    @classmethod
    def tiny(cls, **overrides) -> "GPT2Config":
        """For tests and CPU runs: byte vocabulary, 2 layers, 4 heads of 16."""
        return cls(**{**dict(vocab_size=256, n_positions=256, n_embd=64, n_layer=2, n_head=4),
                      **overrides})

    @classmethod
    def small(cls, **overrides) -> "GPT2Config":
        """GPT-2 small, 124M parameters (HF ``gpt2``)."""
        return cls(**overrides)

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> "GPT2Config":
        """From a parsed HF ``config.json``; rejects variants this model does not implement."""
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"only the tanh-approximate GELU is supported, got "
                             f"activation_function={hf['activation_function']!r}")
        n_inner = hf.get("n_inner")
        if n_inner is not None and n_inner != 4 * hf["n_embd"]:
            raise ValueError(f"only n_inner = 4 * n_embd is supported, got n_inner={n_inner}")
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if hf.get(flag, False):
                raise ValueError(f"HF option {flag}=True is not supported")
        fields = {k: hf[k] for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head",
                                     "layer_norm_epsilon") if k in hf}
        return cls(**{**fields, **overrides})


class KVCache(NamedTuple):
    """Per-layer key/value caches ``[B, S_max, N, H]`` and the valid length of each row ``[B]``."""

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    lengths: jax.Array

    @classmethod
    def empty(cls, config: GPT2Config, batch_size: int, max_length: int) -> "KVCache":
        shape = (batch_size, max_length, config.n_head, config.head_dim)
        zeros = tuple(jnp.zeros(shape, config.dtype) for _ in range(config.n_layer))
        return cls(zeros, zeros, jnp.zeros((batch_size,), jnp.int32))


def attend(q, k, v, attention: str, *, is_causal: bool = False, kv_lengths=None):
    """``[B, T, N, H]`` attention through the configured implementation (causal and/or lengths)."""
    if attention == "xla":
        return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal,
                                            key_value_seq_lengths=kv_lengths, implementation="xla")
    if attention == "cudnn":
        if jax.default_backend() != "gpu":
            raise ValueError(f"attention='cudnn' needs a CUDA GPU, but the JAX backend is "
                             f"{jax.default_backend()!r}; use 'xla' or 'pallas_flash'")
        if q.dtype not in (jnp.float16, jnp.bfloat16):
            raise ValueError(f"attention='cudnn' needs float16 or bfloat16 activations, got {q.dtype}; "
                             "set GPT2Config.dtype=jnp.bfloat16 (--bf16)")
        return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal,
                                            key_value_seq_lengths=kv_lengths, implementation="cudnn")
    impl = attention.partition(":")[2] or None
    return pallas_flash.dot_product_attention(q, k, v, is_causal=is_causal,
                                              key_value_seq_lengths=kv_lengths, implementation=impl)


def cached_attention(q, k_cache, v_cache, lengths, attention: str):
    """Attention of T new queries against a KV cache that already holds them.

    Args:
      q: ``[B, T, N, H]``, the queries of absolute positions ``lengths - T + t``.
      k_cache, v_cache: ``[B, S_max, N, H]``; entries at and past ``lengths`` are stale.
      lengths: ``[B]`` int32, valid cache entries per row *including* the T new ones.
      attention: a `GPT2Config.attention` name.

    The single call site of decode attention.
    """
    T, S = q.shape[1], k_cache.shape[1]
    if attention in ("pallas_flash", "pallas_flash:triton") and T <= pallas_flash.decode.MAX_QUERY_TOKENS:
        # Flash-decoding (split-K over the cache); its causal band is aligned at the bottom right,
        # i.e. query t sits at position lengths - T + t, exactly this function's contract.
        return pallas_flash.decode_attention(q, k_cache, v_cache, cache_lengths=lengths)
    if T == 1:
        # The one query is the newest position, so "causal" is exactly "keys < lengths".
        return attend(q, k_cache, v_cache, attention, kv_lengths=lengths)
    # A chunk after a non-empty prefix needs a causal band offset per row; jax.nn's is_causal is
    # top-left aligned and the Pallas kernel takes no mask arrays, so this builds the mask for XLA.
    first = (lengths - T)[:, None, None, None]  # [B, 1, 1, 1]
    visible = jnp.arange(S)[None, None, None, :] <= first + jnp.arange(T)[None, None, :, None]
    return jax.nn.dot_product_attention(q, k_cache, v_cache, mask=visible, implementation="xla")


def _write(cache, new, start):
    """Writes ``new [B, T, N, H]`` into ``cache [B, S_max, N, H]`` at a per-row offset ``start [B]``."""
    return jax.vmap(lambda c, n, s: jax.lax.dynamic_update_slice(c, n, (s, 0, 0)))(cache, new, start)


def _linear(config: GPT2Config, d_in: int, d_out: int, std: float, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, dtype=config.dtype, param_dtype=config.param_dtype,
                      kernel_init=nnx.initializers.normal(std), rngs=rngs)


def _layer_norm(config: GPT2Config, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(config.n_embd, epsilon=config.layer_norm_epsilon, dtype=config.dtype,
                         param_dtype=config.param_dtype, rngs=rngs)


class Attention(nnx.Module):
    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
        self.config = config
        D = config.n_embd
        self.c_attn = _linear(config, D, 3 * D, 0.02, rngs)
        # GPT-2's scaled init of residual projections: the residual stream sums 2 * n_layer of them.
        self.c_proj = _linear(config, D, D, 0.02 / math.sqrt(2 * config.n_layer), rngs)

    def __call__(self, x, cache: tuple | None = None):
        """x ``[B, T, D]``; cache ``(k_cache, v_cache, old_lengths)`` or None."""
        c = self.config
        B, T, D = x.shape
        qkv = self.c_attn(x)  # [B, T, 3D], HF order q | k | v
        q, k, v = (t.reshape(B, T, c.n_head, c.head_dim) for t in jnp.split(qkv, 3, axis=-1))
        if cache is None:
            out, new_kv = attend(q, k, v, c.attention, is_causal=True), None
        else:
            k_cache, v_cache, old_lengths = cache
            k_cache, v_cache = _write(k_cache, k, old_lengths), _write(v_cache, v, old_lengths)
            out = cached_attention(q, k_cache, v_cache, old_lengths + T, c.attention)
            new_kv = (k_cache, v_cache)
        return self.c_proj(out.reshape(B, T, D)), new_kv  # heads merged back: [B, T, D]


class MLP(nnx.Module):
    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
        D = config.n_embd
        self.c_fc = _linear(config, D, 4 * D, 0.02, rngs)
        self.c_proj = _linear(config, 4 * D, D, 0.02 / math.sqrt(2 * config.n_layer), rngs)

    def __call__(self, x):
        return self.c_proj(jax.nn.gelu(self.c_fc(x), approximate=True))


class Block(nnx.Module):
    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
        self.ln_1 = _layer_norm(config, rngs)
        self.attn = Attention(config, rngs=rngs)
        self.ln_2 = _layer_norm(config, rngs)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, cache=None):
        a, new_kv = self.attn(self.ln_1(x), cache)
        x = x + a
        return x + self.mlp(self.ln_2(x)), new_kv


class GPT2(nnx.Module):
    """GPT-2 language model with tied input/output embeddings."""

    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
        self.config = config
        embed = dict(dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
        self.wte = nnx.Embed(config.vocab_size, config.n_embd,
                             embedding_init=nnx.initializers.normal(0.02), **embed)
        self.wpe = nnx.Embed(config.n_positions, config.n_embd,
                             embedding_init=nnx.initializers.normal(0.01), **embed)
        self.h = nnx.List([Block(config, rngs=rngs) for _ in range(config.n_layer)])
        self.ln_f = _layer_norm(config, rngs)

    def __call__(self, tokens, *, cache: KVCache | None = None):
        """Float32 logits ``[B, T, vocab]`` of ``tokens [B, T]``; with a cache, ``(logits, cache)``.

        With a cache, ``tokens`` continue each row at position ``cache.lengths[b]``; their keys and
        values are written there and the returned cache's lengths grow by T.
        """
        B, T = tokens.shape
        start = jnp.zeros((B,), jnp.int32) if cache is None else cache.lengths
        positions = start[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]  # [B, T]
        x = self.wte(tokens) + self.wpe(positions)
        new_keys, new_values = [], []
        for i, block in enumerate(self.h):
            layer_cache = None if cache is None else (cache.keys[i], cache.values[i], cache.lengths)
            x, new_kv = block(x, layer_cache)
            if new_kv is not None:
                new_keys.append(new_kv[0])
                new_values.append(new_kv[1])
        x = self.ln_f(x)
        # Tied head; float32 accumulation keeps the softmax/loss stable under bf16 compute.
        logits = jnp.einsum("btd,vd->btv", x, self.wte.embedding[...].astype(x.dtype),
                            preferred_element_type=jnp.float32)
        if cache is None:
            return logits
        return logits, KVCache(tuple(new_keys), tuple(new_values), cache.lengths + T)


# --- Hugging Face checkpoints -------------------------------------------------------------------

_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # HF's causal-mask buffers, not weights


def _hf_variables(model: GPT2) -> dict[str, nnx.Variable]:
    """HF safetensors key (without ``transformer.``) -> the model variable holding it."""
    out = {"wte.weight": model.wte.embedding, "wpe.weight": model.wpe.embedding,
           "ln_f.weight": model.ln_f.scale, "ln_f.bias": model.ln_f.bias}
    for i, block in enumerate(model.h):
        for name, layer in (("ln_1", block.ln_1), ("ln_2", block.ln_2)):
            out[f"h.{i}.{name}.weight"] = layer.scale
            out[f"h.{i}.{name}.bias"] = layer.bias
        for name, layer in (("attn.c_attn", block.attn.c_attn), ("attn.c_proj", block.attn.c_proj),
                            ("mlp.c_fc", block.mlp.c_fc), ("mlp.c_proj", block.mlp.c_proj)):
            out[f"h.{i}.{name}.weight"] = layer.kernel  # Conv1D [in, out] == nnx.Linear kernel
            out[f"h.{i}.{name}.bias"] = layer.bias
    return out


def to_hf_state_dict(model: GPT2) -> dict[str, np.ndarray]:
    """The model's weights as an HF ``GPT2Model`` state dict (numpy, float32)."""
    return {k: np.asarray(v[...], np.float32) for k, v in _hf_variables(model).items()}


def load_hf_gpt2(path: str | os.PathLike, **config_overrides) -> GPT2:
    """Builds a `GPT2` from a local HF GPT-2 directory (``config.json`` + ``model.safetensors``).

    ``config_overrides`` set non-architecture fields, e.g. ``attention="pallas_flash"`` or
    ``dtype=jnp.bfloat16``.

    Raises:
      FileNotFoundError: a missing file.
      ValueError: an unsupported config, or tensors missing, unexpected or of the wrong shape.
    """
    from safetensors.numpy import load_file

    with open(os.path.join(path, "config.json")) as f:
        config = GPT2Config.from_hf(json.load(f), **config_overrides)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    model = GPT2(config, rngs=nnx.Rngs(0))
    targets = _hf_variables(model)
    missing = sorted(set(targets) - set(tensors))
    if missing:
        raise ValueError(f"checkpoint at {path} lacks {len(missing)} tensors, e.g. {missing[:4]}")
    lm_head = tensors.pop("lm_head.weight", None)
    if lm_head is not None and not np.array_equal(lm_head, tensors["wte.weight"]):
        raise ValueError("lm_head.weight differs from wte.weight; only tied embeddings are supported")
    unexpected = sorted(k for k in set(tensors) - set(targets) if not k.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        raise ValueError(f"checkpoint at {path} has unexpected tensors, e.g. {unexpected[:4]}")
    for name, variable in targets.items():
        value = tensors[name]
        if value.shape != variable[...].shape:
            raise ValueError(f"{name}: checkpoint shape {value.shape} != model shape "
                             f"{variable[...].shape}")
        variable[...] = jnp.asarray(value, config.param_dtype)
    return model


def save_hf_gpt2(model: GPT2, path: str | os.PathLike) -> None:
    """Writes ``config.json`` + ``model.safetensors`` in HF GPT-2 layout (loadable by `load_hf_gpt2`)."""
    from safetensors.numpy import save_file

    c = model.config
    os.makedirs(path, exist_ok=True)
    hf_config = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=c.vocab_size,
                     n_positions=c.n_positions, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
                     layer_norm_epsilon=c.layer_norm_epsilon, activation_function="gelu_new",
                     n_inner=None, tie_word_embeddings=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    save_file(to_hf_state_dict(model), os.path.join(path, "model.safetensors"))
