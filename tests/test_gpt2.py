"""models.gpt2 / train / generate on the tiny config: attention swap, training, HF loading, KV cache.

The Pallas kernel runs in interpret mode (``pallas_flash:triton``); references are the model with
``xla`` attention and, for the loader, a float64 numpy GPT-2 written here from the raw HF tensors.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from models.generate import generate, sample
from models.gpt2 import (GPT2, GPT2Config, KVCache, cached_attention, load_hf_gpt2, save_hf_gpt2,
                         to_hf_state_dict)
from models.train import train
from models.tokenizer import ByteTokenizer, load_corpus

TOL = 2e-5
PALLAS = "pallas_flash:triton"


def _np_rng(rng):
    """numpy generator from the test's fresh key (eager jax.random compiles per op: slow on CPU)."""
    return np.random.default_rng(np.asarray(jax.random.key_data(rng)).tolist())


def _model(config, seed):
    # Initialised under jit for the same reason.
    return nnx.jit(lambda: GPT2(config, rngs=nnx.Rngs(seed)))()


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


# --- attention swap ----------------------------------------------------------------------------

def test_swap_equivalence_logits_and_every_gradient(rng):
    gen = _np_rng(rng)
    seed = int(gen.integers(2**31))
    ref = _model(GPT2Config.tiny(attention="xla"), seed)
    swapped = _model(GPT2Config.tiny(attention=PALLAS), seed)
    tokens = jnp.asarray(gen.integers(0, 256, (2, 33)), jnp.int32)

    def loss_and_logits(model, batch):
        logits = model(batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean(), logits

    @nnx.jit
    def logits_loss_grads(model, batch):
        (loss, logits), grads = nnx.value_and_grad(loss_and_logits, has_aux=True)(model, batch)
        return logits, loss, grads

    logits_r, loss_r, grads_r = logits_loss_grads(ref, tokens)
    logits_s, loss_s, grads_s = logits_loss_grads(swapped, tokens)
    assert _rel(logits_s, logits_r) < TOL
    assert abs(float(loss_s) - float(loss_r)) < TOL * float(loss_r)
    flat_r, flat_s = nnx.to_flat_state(grads_r), nnx.to_flat_state(grads_s)
    assert [p for p, _ in flat_r] == [p for p, _ in flat_s]
    assert len(flat_r) == 4 + 12 * 2  # wte, wpe, ln_f x2 + 12 tensors per block
    for (path, g_r), (_, g_s) in zip(flat_r, flat_s):
        g_r, g_s = np.asarray(g_r[...]), np.asarray(g_s[...])
        if path[-2:] == ("c_attn", "bias"):
            # The key third of c_attn's bias shifts every logit of a row equally: zero gradient.
            g_r, g_s = np.delete(g_r, np.s_[64:128]), np.delete(g_s, np.s_[64:128])
        assert np.abs(g_r).max() > 0, path
        assert _rel(g_s, g_r) < 1e-4, path


def test_training_lowers_loss_and_attentions_agree():
    data = load_corpus()
    run = dict(steps=6, batch_size=4, seq_len=32, lr=3e-3, seed=int(np.random.default_rng().integers(2**31)),
               data=data, quiet=True)
    curve_x = train(GPT2Config.tiny(attention="xla"), **run).losses
    curve_p = train(GPT2Config.tiny(attention=PALLAS), **run).losses
    assert np.all(np.isfinite(curve_p))
    # Random batches are noisy step to step; the first and last two steps are far apart.
    assert np.mean(curve_p[-2:]) < np.mean(curve_p[:2]) - 0.1
    np.testing.assert_allclose(curve_p, curve_x, rtol=1e-4)


def test_cudnn_and_bad_attention_names_fail_clearly():
    with pytest.raises(ValueError, match="attention must be one of"):
        GPT2Config.tiny(attention="flash")
    if jax.default_backend() != "gpu":
        model = GPT2(GPT2Config.tiny(attention="cudnn", n_layer=1), rngs=nnx.Rngs(0))
        with pytest.raises(ValueError, match="CUDA GPU"):
            model(jnp.zeros((1, 4), jnp.int32))


# --- Hugging Face checkpoints --------------------------------------------------------------------

def _hf_tensors(gen, c: GPT2Config, prefix: str):
    D, V, P = c.n_embd, c.vocab_size, c.n_positions
    t = {f"{prefix}wte.weight": gen.normal(0, 0.3, (V, D)), f"{prefix}wpe.weight": gen.normal(0, 0.1, (P, D)),
         f"{prefix}ln_f.weight": gen.normal(1, 0.1, D), f"{prefix}ln_f.bias": gen.normal(0, 0.1, D)}
    for i in range(c.n_layer):
        h = f"{prefix}h.{i}."
        for name, shape in (("ln_1.weight", D), ("ln_2.weight", D)):
            t[h + name] = gen.normal(1, 0.1, shape)
        for name, (d_in, d_out) in (("attn.c_attn", (D, 3 * D)), ("attn.c_proj", (D, D)),
                                    ("mlp.c_fc", (D, 4 * D)), ("mlp.c_proj", (4 * D, D))):
            t[h + name + ".weight"] = gen.normal(0, 0.2, (d_in, d_out))  # Conv1D: [in, out]
            t[h + name + ".bias"] = gen.normal(0, 0.1, d_out)
        for name in ("ln_1.bias", "ln_2.bias"):
            t[h + name] = gen.normal(0, 0.1, D)
        # HF's causal-mask buffers, which the loader must skip.
        t[h + "attn.bias"] = np.tril(np.ones((P, P)))[None, None]
        t[h + "attn.masked_bias"] = np.array(-1e4)
    return {k: np.asarray(v, np.float32) for k, v in t.items()}


def _numpy_gpt2(t, c: GPT2Config, tokens):
    """HF GPT2LMHeadModel's forward in float64 numpy, from the raw HF tensors."""
    t = {k.removeprefix("transformer."): np.asarray(v, np.float64) for k, v in t.items()}

    def ln(x, w, b):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + c.layer_norm_epsilon) * w + b

    def gelu_new(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

    B, T = tokens.shape
    N, H = c.n_head, c.head_dim
    x = t["wte.weight"][tokens] + t["wpe.weight"][np.arange(T)]
    causal = np.tril(np.ones((T, T), bool))
    for i in range(c.n_layer):
        p = lambda name: t[f"h.{i}.{name}"]  # noqa: E731
        a = ln(x, p("ln_1.weight"), p("ln_1.bias")) @ p("attn.c_attn.weight") + p("attn.c_attn.bias")
        q, k, v = (a[..., j * c.n_embd:(j + 1) * c.n_embd].reshape(B, T, N, H).transpose(0, 2, 1, 3)
                   for j in range(3))  # [B, N, T, H]
        s = np.where(causal, q @ k.transpose(0, 1, 3, 2) / np.sqrt(H), -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        o = (w / w.sum(-1, keepdims=True)) @ v  # [B, N, T, H]
        o = o.transpose(0, 2, 1, 3).reshape(B, T, c.n_embd)
        x = x + o @ p("attn.c_proj.weight") + p("attn.c_proj.bias")
        m = gelu_new(ln(x, p("ln_2.weight"), p("ln_2.bias")) @ p("mlp.c_fc.weight") + p("mlp.c_fc.bias"))
        x = x + m @ p("mlp.c_proj.weight") + p("mlp.c_proj.bias")
    return ln(x, t["ln_f.weight"], t["ln_f.bias"]) @ t["wte.weight"].T


def _write_hf(path, c: GPT2Config, tensors, **config_changes):
    from safetensors.numpy import save_file

    hf = dict(model_type="gpt2", vocab_size=c.vocab_size, n_positions=c.n_positions, n_embd=c.n_embd,
              n_layer=c.n_layer, n_head=c.n_head, n_inner=None, activation_function="gelu_new",
              layer_norm_epsilon=c.layer_norm_epsilon)
    hf.update(config_changes)
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf))
    save_file(tensors, str(path / "model.safetensors"))


@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_hf_loader_matches_numpy_gpt2(rng, tmp_path, prefix):
    gen = _np_rng(rng)
    c = GPT2Config.tiny(n_positions=64, n_head=2)
    tensors = _hf_tensors(gen, c, prefix)
    if prefix:
        tensors["lm_head.weight"] = tensors["transformer.wte.weight"]
    _write_hf(tmp_path / "ckpt", c, tensors)
    model = load_hf_gpt2(tmp_path / "ckpt")
    assert model.config == c
    tokens = gen.integers(0, c.vocab_size, (2, 24))
    logits = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(tokens, jnp.int32))
    assert _rel(logits, _numpy_gpt2(tensors, c, tokens)) < 1e-5
    # Round trip: exporting gives back exactly the tensors that were loaded.
    exported = to_hf_state_dict(model)
    for k, v in tensors.items():
        k = k.removeprefix("transformer.")
        if k in exported:
            np.testing.assert_array_equal(exported[k], v)
    assert set(exported) == {k.removeprefix(prefix) for k in tensors
                             if not k.endswith((".attn.bias", ".masked_bias")) and k != "lm_head.weight"}
    save_hf_gpt2(model, tmp_path / "again")
    again = load_hf_gpt2(tmp_path / "again", attention=PALLAS)
    assert again.config == c.replace(attention=PALLAS)
    assert jax.tree.all(jax.tree.map(jnp.array_equal, nnx.state(model), nnx.state(again)))


def test_hf_loader_rejects_bad_checkpoints(tmp_path):
    gen = np.random.default_rng()
    c = GPT2Config.tiny(n_layer=1, n_positions=32)
    tensors = _hf_tensors(gen, c, "")
    del tensors["h.0.mlp.c_fc.bias"]
    _write_hf(tmp_path / "missing", c, tensors)
    with pytest.raises(ValueError, match="lacks"):
        load_hf_gpt2(tmp_path / "missing")
    tensors = _hf_tensors(gen, c, "")
    _write_hf(tmp_path / "relu", c, tensors, activation_function="relu")
    with pytest.raises(ValueError, match="GELU"):
        load_hf_gpt2(tmp_path / "relu")
    tensors["h.0.attn.c_proj.weight"] = tensors["h.0.attn.c_proj.weight"].T[:, :-1]
    _write_hf(tmp_path / "shape", c, tensors)
    with pytest.raises(ValueError, match="shape"):
        load_hf_gpt2(tmp_path / "shape")


# --- KV cache and generation ----------------------------------------------------------------------

def _reference_attention(q, k, v, visible):
    s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    s = np.where(visible, s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bnts,bsnh->btnh", w / w.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("T,attention", [(1, PALLAS), (1, "xla"), (5, "xla")])
def test_cached_attention_masks_stale_entries(rng, T, attention):
    gen = _np_rng(rng)
    B, S, N, H = 3, 40, 2, 16
    q = gen.standard_normal((B, T, N, H)).astype(np.float32)
    k = gen.standard_normal((B, S, N, H)).astype(np.float32)
    v = gen.standard_normal((B, S, N, H)).astype(np.float32)
    lengths = gen.integers(T, S + 1, B).astype(np.int32)
    lengths[0] = T  # a row whose whole cache is the new chunk
    out = jax.jit(cached_attention, static_argnums=4)(q, k, v, lengths, attention)
    pos = lengths[:, None] - T + np.arange(T)  # [B, T] absolute query positions
    visible = (np.arange(S)[None, None, :] <= pos[:, :, None])[:, None]  # [B, 1, T, S]
    assert _rel(out, _reference_attention(q, k, v, visible)) < TOL


@pytest.mark.parametrize("temperature,top_k", [(0.0, None), (1.0, 20)])
def test_generation_with_cache_equals_without(rng, temperature, top_k):
    gen = _np_rng(rng)
    model = _model(GPT2Config.tiny(n_positions=64), int(gen.integers(2**31)))
    prompts = gen.integers(0, 256, (3, 10))
    lengths = np.array([10, int(gen.integers(1, 10)), 1])  # right-padded rows of different lengths
    key = jax.random.key(int(gen.integers(2**31)))
    kw = dict(max_new_tokens=12, prompt_lengths=lengths, temperature=temperature, top_k=top_k, rng=key,
              return_logits=True)
    tok_c, logits_c = generate(model, prompts, use_cache=True, **kw)
    tok_n, logits_n = generate(model, prompts, use_cache=False, **kw)
    assert _rel(logits_c, logits_n) < 1e-5
    np.testing.assert_array_equal(tok_c, tok_n)
    for b, L in enumerate(lengths):
        np.testing.assert_array_equal(tok_c[b, :L], prompts[b, :L])
        assert np.all(np.asarray(tok_c[b, L + 12:]) == 0)
        new = np.asarray(tok_c[b, L:L + 12])
        if temperature == 0.0:
            np.testing.assert_array_equal(new, np.argmax(logits_c[b], -1))
        else:
            kth = np.sort(np.asarray(logits_c[b]), -1)[:, -top_k]
            assert np.all(np.take_along_axis(np.asarray(logits_c[b]), new[:, None], 1)[:, 0] >= kth)


def test_sampling_top1_is_greedy_and_inputs_are_validated(rng):
    logits = jnp.asarray(_np_rng(rng).standard_normal((4, 256)), jnp.float32)
    greedy = sample(logits, None, temperature=0.0, top_k=None)
    np.testing.assert_array_equal(sample(logits, rng, temperature=2.0, top_k=1), greedy)
    model = GPT2(GPT2Config.tiny(n_layer=1, n_positions=16), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="n_positions"):
        generate(model, jnp.zeros((1, 10), jnp.int32), max_new_tokens=7)
    with pytest.raises(ValueError, match="rng"):
        generate(model, jnp.zeros((1, 4), jnp.int32), max_new_tokens=2, temperature=1.0)
    with pytest.raises(ValueError, match="prompt_lengths"):
        generate(model, jnp.zeros((2, 4), jnp.int32), max_new_tokens=2, prompt_lengths=[0, 4])


def test_byte_tokenizer_round_trips():
    tok = ByteTokenizer()
    text = "The river remembered everything — naïve café."
    ids = tok.encode(text)
    assert ids.max() < tok.vocab_size and tok.decode(ids) == text
    assert KVCache.empty(GPT2Config.tiny(), 2, 8).keys[0].shape == (2, 8, 4, 16)
