"""pallas_flash.flax: the attention_fn is a drop-in for flax's, in nnx and linen layers alike.

References are flax's own attention layers with their default attention_fn (and, for linen, an
explicit causal mask); the swapped layers run the Pallas kernel in interpret mode.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx

import pallas_flash.flax as pf
from helpers import rel_err

TOL = 2e-5  # float32, relative (rel_err)
B, T, D, N = 2, 32, 64, 4


def _np_rng(rng):
    """A numpy generator seeded from the test's fresh key: eager jax.random ops compile one by one,
    which costs seconds per shape on a small CPU."""
    return np.random.default_rng(np.asarray(jax.random.key_data(rng)).tolist())


def _normal(gen, shape):
    return jnp.asarray(gen.standard_normal(shape), jnp.float32)


def _grads_match(g, g_ref):
    """Every leaf within TOL relative, or within float32 noise of the largest gradient: some
    (the key-projection bias) are exactly zero in exact arithmetic."""
    leaves, ref_leaves = jax.tree.leaves(g), jax.tree.leaves(g_ref)
    assert len(leaves) == len(ref_leaves) > 0
    scale = max(float(np.abs(np.asarray(b)).max()) for b in ref_leaves)
    assert scale > 0
    for a, b in zip(leaves, ref_leaves):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert a.shape == b.shape
        assert np.linalg.norm(a - b) <= TOL * np.linalg.norm(b) + 1e-6 * scale * np.sqrt(b.size)


def test_nnx_layer_swap_matches_flax_attention(rng):
    gen = _np_rng(rng)
    seed = int(gen.integers(2**31))
    # Built under jit: eager initialisers compile op by op, which is slow on a small CPU.
    ref = nnx.jit(lambda: nnx.MultiHeadAttention(N, D, decode=False, rngs=nnx.Rngs(seed)))()
    # The one-line swap: the same constructor call, pallas_flash's layer, same seed, same weights.
    swapped = nnx.jit(lambda: pf.MultiHeadAttention(
        N, D, decode=False, rngs=nnx.Rngs(seed),
        attention_fn=pf.make_attention_fn(implementation="triton")))()
    assert jax.tree.all(jax.tree.map(jnp.array_equal, nnx.state(ref), nnx.state(swapped)))
    x, dy = _normal(gen, (B, T, D)), _normal(gen, (B, T, D))

    def loss(model, x):
        return jnp.sum(model(x, is_causal=True) * dy)

    loss_and_grad = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1)))
    (l_ref, g_ref) = loss_and_grad(ref, x)
    (l, g) = loss_and_grad(swapped, x)
    assert abs(float(l) - float(l_ref)) <= TOL * (1 + abs(float(l_ref)))
    _grads_match(nnx.state(g[0], nnx.Param), nnx.state(g_ref[0], nnx.Param))
    _grads_match(g[1], g_ref[1])


def test_linen_layer_swap_matches_flax_attention_with_causal_mask(rng):
    gen = _np_rng(rng)
    x, dy = _normal(gen, (B, T, D)), _normal(gen, (B, T, D))
    ref = linen.MultiHeadDotProductAttention(num_heads=N)
    swapped = pf.MultiHeadDotProductAttention(
        num_heads=N, attention_fn=pf.make_attention_fn(is_causal=True, implementation="triton"))
    params = jax.jit(ref.init)(jax.random.key(int(gen.integers(2**31))), x)
    causal = linen.make_causal_mask(jnp.ones((B, T)))

    def loss_ref(params, x):
        return jnp.sum(ref.apply(params, x, mask=causal) * dy)

    def loss(params, x):
        return jnp.sum(swapped.apply(params, x) * dy)

    l_ref, g_ref = jax.jit(jax.value_and_grad(loss_ref, argnums=(0, 1)))(params, x)
    l, g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)
    assert abs(float(l) - float(l_ref)) <= TOL * (1 + abs(float(l_ref)))
    _grads_match(g, g_ref)


@pytest.mark.parametrize("mask_dtype", [jnp.bool_, jnp.float32])
def test_masks_and_extra_batch_dims_match_flax(rng, mask_dtype):
    """Padding masks (bool or flax's float 0/1), extra batch dims, bias; no kernel needed."""
    gen = _np_rng(rng)
    shape = (3, 2, T, N, 16)  # [batch1, batch2, T, N, H]
    q, k, v = (_normal(gen, shape) for _ in range(3))
    kv_len = jnp.asarray(gen.integers(1, T + 1, shape[:2]))
    valid = jnp.arange(T) < kv_len[..., None]  # [b1, b2, S]
    mask = linen.make_attention_mask(jnp.ones(shape[:3]), valid, dtype=mask_dtype)  # [b1, b2, 1, T, S]
    bias = _normal(gen, (N, T, T))
    out = jax.jit(pf.attention_fn)(q, k, v, bias, mask)
    ref = jax.jit(lambda *a: nnx.dot_product_attention(*a, deterministic=True))(q, k, v, bias, mask)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < TOL


def test_dtype_argument_casts_like_flax(rng):
    gen = _np_rng(rng)
    q, k, v = (_normal(gen, (B, T, N, 16)) for _ in range(3))
    out = jax.jit(lambda q, k, v: pf.attention_fn(q, k, v, dtype=jnp.bfloat16, is_causal=True))(q, k, v)
    assert out.dtype == jnp.bfloat16
    causal = nnx.make_causal_mask(jnp.ones((B, T)))
    ref = jax.jit(lambda q, k, v: nnx.dot_product_attention(q, k, v, mask=causal, dtype=jnp.bfloat16,
                                                            deterministic=True))(q, k, v)
    assert rel_err(out, ref) < 2e-2


def test_dropout_and_sow_weights_are_rejected_clearly():
    x = jnp.ones((1, 16, D))
    layer = pf.MultiHeadAttention(N, D, dropout_rate=0.1, decode=False, rngs=nnx.Rngs(0))
    with pytest.raises(NotImplementedError, match="dropout"):
        layer(x, deterministic=False)
    # Deterministic (eval) mode has nothing to drop, so it runs.
    assert layer(x, deterministic=True).shape == x.shape
    with pytest.raises(NotImplementedError, match="sow"):
        pf.MultiHeadAttention(N, D, decode=False, rngs=nnx.Rngs(0))(x, sow_weights=True)


def test_mask_array_with_forced_kernel_runs():
    q = jax.random.normal(jax.random.key(0), (1, 16, N, 16))
    mask = jnp.tril(jnp.ones((16, 16), bool))[None, None]
    got = pf.attention_fn(q, q, q, mask=mask, implementation="triton")
    want = pf.attention_fn(q, q, q, mask=mask, implementation="xla")
    assert rel_err(got, want) < TOL
    with pytest.raises(ValueError, match="implementation"):
        pf.make_attention_fn(implementation="cuda")
