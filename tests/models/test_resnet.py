"""The residual networks for 32x32 images: output shapes, parameter counts as published,
the FLOPs line of the model summary, and every built-in trains one step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from flaxcnn.models import MODELS, create_model
from flaxcnn.models.resnet import dirac_init
from flaxcnn.reporting.summary import flops_per_image, model_summary, parameter_count
from flaxcnn.training.state import create_train_state

IMAGE = (32, 32, 3)
# Parameters (batch norm's scales and offsets included, its statistics not).
COUNTS = {"ResNet20": 269_722, "ResNet56": 853_018, "PreActResNet18": 11_172_170}


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_published_nets_have_their_parameter_counts(name):
    model = create_model(name, num_classes=10)
    variables = jax.eval_shape(
        lambda x: model.init(jax.random.key(0), x, train=False), jnp.zeros((1, *IMAGE))
    )
    assert parameter_count(variables["params"]) == COUNTS[name]
    assert set(variables) == {"params", "batch_stats"}


def test_flops_per_image_grow_with_depth_as_the_convolutions_do():
    flops = {n: flops_per_image(create_model(n, num_classes=10), IMAGE) for n in COUNTS}
    # ResNet-20: 41 M multiply-adds (He et al.), so about 82 M operations.
    assert 70e6 < flops["ResNet20"] < 90e6
    # ResNet-56 has three times the blocks of ResNet-20.
    assert 2.8 < flops["ResNet56"] / flops["ResNet20"] < 3.2
    assert flops["PreActResNet18"] > 10 * flops["ResNet20"]


@pytest.mark.parametrize("name", ["ResNet20", "PreActResNet18", "FastResNet", "CifarResNet"])
def test_each_built_in_trains_a_step_on_32x32_rgb(name):
    kwargs = (
        {"widths": (8, 16)}
        if name != "FastResNet"
        else {"stem": 8, "widths": (8, 16), "residual": (1, 1)}
    )
    model = create_model(name, num_classes=10, **kwargs)
    state = create_train_state(model, optax.sgd(0.1), jax.random.key(0), IMAGE)
    x = jax.random.uniform(jax.random.key(1), (4, *IMAGE))

    def loss(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(4)).mean(), (
            logits,
            updates,
        )

    (value, (logits, updates)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        state.params
    )
    assert logits.shape == (4, 10) and np.isfinite(value)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    assert any(np.abs(g).sum() > 0 for g in jax.tree.leaves(grads))
    assert name in MODELS


def test_summary_shows_parameters_and_flops():
    model = create_model("ResNet20", num_classes=10)
    state = create_train_state(model, optax.sgd(0.1), jax.random.key(0), IMAGE)
    summary = model_summary(state, IMAGE)
    flops = flops_per_image(model, IMAGE)
    assert f"Forward FLOPs per image: {flops / 1e6:,.1f} M" in summary
    assert "Total Parameters: " in summary


def test_fast_resnet_bad_settings_are_one_line_errors():
    x = jnp.zeros((1, *IMAGE))
    with pytest.raises(ValueError, match="activation must be one of relu, gelu"):
        create_model("FastResNet", activation="tanh").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="one `residual` count per stage"):
        create_model("FastResNet", residual=(1,)).init(jax.random.key(0), x)


def test_a_users_copy_in_a_file_computes_the_built_ins_program(tmp_path):
    """A plain `flax.linen` ResNet from a user's file runs as fast as the built-in of the
    same shape: its training step is the same program, operation for operation."""
    import pathlib

    from flaxcnn.models import resnet

    user_file = tmp_path / "my_resnet.py"
    user_file.write_text(pathlib.Path(resnet.__file__).read_text())
    kwargs = {"num_classes": 10, "stem": 8, "widths": (8, 16), "residual": (1, 1)}
    programs = []
    for spec in ("FastResNet", f"{user_file}:FastResNet"):
        model = create_model(spec, **kwargs)
        state = create_train_state(model, optax.sgd(0.1), jax.random.key(0), IMAGE)

        def loss(params, model=model, state=state):
            variables = {"params": params, "batch_stats": state.batch_stats}
            logits, _ = model.apply(
                variables, jnp.zeros((2, *IMAGE)), train=True, mutable=["batch_stats"]
            )
            return logits.sum()

        programs.append(str(jax.make_jaxpr(jax.grad(loss))(state.params)))
    assert programs[0] == programs[1]


def test_dirac_init_passes_the_first_channels_through():
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 4))
    conv = nn.Conv(6, (3, 3), use_bias=False, kernel_init=dirac_init())
    variables = conv.init(jax.random.key(1), x)
    y = conv.apply(variables, x)
    np.testing.assert_allclose(y[..., :4], x, atol=1e-6)
    assert float(jnp.abs(y[..., 4:]).mean()) > 0.1  # The other filters stay random.


def test_fast_resnet_with_airbench_init_has_a_whitened_stem_and_no_bn_scales():
    model = create_model("FastResNet", whiten=True, dirac=True, bn_scale=False, stem=24)
    variables = model.init(jax.random.key(0), jnp.zeros((1, *IMAGE)))
    assert variables["batch_stats"]["PatchWhitening_0"]["whitening"].shape == (2, 2, 3, 24)
    assert "PatchWhitening_0" in variables["params"]  # Its bias trains.
    norms = [v for k, v in variables["params"].items() if k.startswith("BatchNorm")]
    assert norms and all(set(norm) == {"bias"} for norm in norms)
    logits = model.apply(variables, jnp.zeros((2, *IMAGE)))
    assert logits.shape == (2, 10)
