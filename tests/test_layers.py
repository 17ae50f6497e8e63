import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from flaxcnn.models.layers import Conv, max_pool_2x2


@pytest.mark.parametrize("channels", [1, 3, 8])  # 1 and 3 take the patch path, 8 lax.conv.
@pytest.mark.parametrize("padding", ["SAME", "VALID"])
def test_conv_matches_flax_conv_and_its_gradients(channels, padding):
    x = jax.random.normal(jax.random.key(0), (4, 11, 10, channels))
    ours, reference = Conv(5, padding=padding), nn.Conv(5, (3, 3), padding=padding)
    params = ours.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(
        jnp.shape, reference.init(jax.random.key(1), x)
    )

    def loss(module, params, x):
        return jnp.sum(jnp.sin(module.apply(params, x)))

    np.testing.assert_allclose(ours.apply(params, x), reference.apply(params, x), atol=1e-5)
    grads = jax.grad(loss, argnums=(1, 2))(ours, params, x)
    expected = jax.grad(loss, argnums=(1, 2))(reference, params, x)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", [(2, 26, 26, 3), (2, 7, 9, 4)])
def test_max_pool_matches_flax_max_pool(shape):
    x = jax.random.normal(jax.random.key(0), shape)
    np.testing.assert_array_equal(max_pool_2x2(x), nn.max_pool(x, (2, 2), (2, 2)))
    grads = jax.grad(lambda x: jnp.sum(max_pool_2x2(x) ** 2))(x)
    expected = jax.grad(lambda x: jnp.sum(nn.max_pool(x, (2, 2), (2, 2)) ** 2))(x)
    np.testing.assert_allclose(grads, expected, atol=1e-6)


def test_conv_rejects_unknown_padding():
    with pytest.raises(ValueError, match="padding"):
        Conv(2, padding="FULL").init(jax.random.key(0), jnp.zeros((1, 5, 5, 1)))
