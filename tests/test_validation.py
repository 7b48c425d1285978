"""Bad input gets a ValueError that names the offending shapes or dtypes."""

import jax
import jax.numpy as jnp
import pytest

import pallas_flash
from pallas_flash import FlashConfig


def _qkv(rng, q_shape=(2, 8, 4, 32), kv_shape=(2, 8, 2, 32), dtype=jnp.float32):
    kq, kk, kv = jax.random.split(rng, 3)
    return (jax.random.normal(kq, q_shape).astype(dtype), jax.random.normal(kk, kv_shape).astype(dtype),
            jax.random.normal(kv, kv_shape).astype(dtype))


@pytest.mark.parametrize("impl", ["triton", "xla", None])
@pytest.mark.parametrize("change, match", [
    (dict(q_shape=(2, 8, 4, 32, 1)), "at most 4 dimensions"),
    (dict(q_shape=(3, 8, 4, 32)), "batch size"),
    (dict(q_shape=(2, 8, 4, 16)), "head dim"),
    (dict(q_shape=(2, 8, 3, 32)), "multiple of key/value heads"),
    (dict(q_shape=(4, 32), kv_shape=(4, 32)), r"query.shape=\(4, 32\)"),
])
def test_bad_shapes(rng, impl, change, match):
    q, k, v = _qkv(rng, **change)
    with pytest.raises(ValueError, match=match):
        pallas_flash.dot_product_attention(q, k, v, implementation=impl)


def test_value_shape_must_match_key(rng):
    q, k, _ = _qkv(rng)
    with pytest.raises(ValueError, match="value.shape"):
        pallas_flash.dot_product_attention(q, k, k[:, :5])


def test_dtypes(rng):
    q, k, v = _qkv(rng)
    with pytest.raises(ValueError, match="share one dtype"):
        pallas_flash.dot_product_attention(q, k.astype(jnp.bfloat16), v)
    with pytest.raises(ValueError, match="floating"):
        pallas_flash.dot_product_attention(q.astype(jnp.int32), k.astype(jnp.int32), v.astype(jnp.int32))


@pytest.mark.parametrize("window", [-1, (3,), (1, -2), (1.5, 2), "3", True])
def test_bad_window(rng, window):
    q, k, v = _qkv(rng)
    with pytest.raises(ValueError, match="local_window_size"):
        pallas_flash.dot_product_attention(q, k, v, local_window_size=window)


def test_bad_lengths_mask_bias_implementation(rng):
    q, k, v = _qkv(rng)
    with pytest.raises(ValueError, match="query_seq_lengths"):
        pallas_flash.dot_product_attention(q, k, v, query_seq_lengths=jnp.array([1, 2, 3]))
    with pytest.raises(ValueError, match="key_value_seq_lengths"):
        pallas_flash.dot_product_attention(q, k, v, key_value_seq_lengths=jnp.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="mask must be boolean"):
        pallas_flash.dot_product_attention(q, k, v, mask=jnp.ones((8, 8), jnp.float32))
    with pytest.raises(ValueError, match="does not broadcast"):
        pallas_flash.dot_product_attention(q, k, v, bias=jnp.ones((2, 3, 8, 8)))
    with pytest.raises(ValueError, match="implementation"):
        pallas_flash.dot_product_attention(q, k, v, implementation="cuda")


@pytest.mark.parametrize("field, value", [("block_q", 48), ("block_k", 8), ("num_warps", 3),
                                          ("num_stages", 0), ("block_q_dq", 100)])
def test_bad_config(field, value):
    with pytest.raises(ValueError, match=field):
        FlashConfig(**{field: value})


def test_empty_dims_config_scale_and_wide_integer_lengths(rng):
    q, k, v = _qkv(rng)
    with pytest.raises(ValueError, match="empty dimension"):
        pallas_flash.dot_product_attention(q[:, :0], k, v)
    with pytest.raises(ValueError, match="config"):
        pallas_flash.dot_product_attention(q, k, v, config={"block_q": 64})
    with pytest.raises(ValueError, match="scale"):
        pallas_flash.dot_product_attention(q, k, v, scale=True)
    with pytest.raises(ValueError, match="int32"):
        pallas_flash.dot_product_attention(q, k, v, key_value_seq_lengths=jnp.array([3, 4], jnp.uint32))
