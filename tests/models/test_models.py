import jax
import jax.numpy as jnp
import pytest

from flaxcnn.models import create_model


def count(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def test_seed_cnn_has_the_keras_parameter_count():
    variables = jax.eval_shape(  # The shapes alone, without compiling.
        create_model("SeedCNN").init, jax.random.key(0), jnp.zeros((1, 28, 28, 1))
    )
    assert count(variables["params"]) == 54_410  # Keras's model.summary() total.
    kernel = variables["params"]["Conv_0"]["kernel"]
    assert kernel.shape == (3, 3, 1, 32)


@pytest.mark.parametrize("name", ["SeedCNN", "CNN", "RNN"])
@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3)])
def test_classifiers_return_float32_logits(name, shape):
    model = create_model(name, num_classes=7)
    # Shapes and dtypes are fixed when tracing: jax.eval_shape finds them without compiling.
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *shape)))
    logits = jax.eval_shape(model.apply, variables, jnp.zeros((5, *shape)))
    assert logits.shape == (5, 7) and logits.dtype == jnp.float32


def test_cnn_hidden_layer_sits_between_the_features_and_the_classes():
    x = jnp.zeros((1, 28, 28, 1))
    plain = jax.eval_shape(create_model("CNN", widths=(32, 64)).init, jax.random.key(0), x)
    hidden = jax.eval_shape(
        create_model("CNN", widths=(32, 64), hidden=128).init, jax.random.key(0), x
    )
    assert "Dense_1" not in plain["params"]
    assert hidden["params"]["Dense_0"]["kernel"].shape == (7 * 7 * 64, 128)
    assert hidden["params"]["Dense_1"]["kernel"].shape == (128, 10)
    # cnn_mnist_best's model: 128 x (3,136 + 10) weights, the hidden batch norm's 2 x 128,
    # and the 10 biases replace the plain model's 3,136 x 10 + 10 classifier.
    assert count(plain["params"]) == 96_554
    assert count(hidden["params"]) == 96_554 - 31_370 + 128 * 3_146 + 256 + 10 == 468_138
    assert hidden["batch_stats"]["BatchNorm_4"]["mean"].shape == (128,)


def test_unknown_model_lists_the_valid_ones():
    with pytest.raises(
        ValueError, match="unknown model 'Resnet'; valid: CNN, CifarResNet, ConvAutoencoder, "
    ):
        create_model("Resnet")
