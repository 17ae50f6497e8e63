"""The device-resident data: the batches gathered on the device are the host pipeline's,
several steps per dispatch compute what single steps do, and evaluation on the device
equals the host pipeline's."""

import functools

import jax
import numpy as np
import optax
import pytest

from flaxcnn.data import batching, device_data, input_pipeline
from flaxcnn.models import create_model
from flaxcnn.runner import steps
from flaxcnn.runtime import sharding
from flaxcnn.tasks import classification
from flaxcnn.training.state import create_train_state


def make_split(n=96, seed=0) -> input_pipeline.Split:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
    return input_pipeline.Split(images, rng.integers(0, 10, n).astype(np.int32), 10)


def test_gathered_batches_equal_the_host_pipelines():
    split = make_split()
    mesh = sharding.create_mesh()
    data = device_data.put_split(split, mesh)
    indices = batching.epoch_indices(split.num_examples, 16, seed=3, epoch=1)
    assert indices.shape == (6, 16) and indices.dtype == np.int32
    order = np.random.default_rng([3, 1]).permutation(split.num_examples)
    np.testing.assert_array_equal(indices.ravel(), order[:96])
    for step in range(len(indices)):
        gathered = jax.jit(device_data.gather_batch)(data, indices[step])
        rows = order[16 * step : 16 * (step + 1)]
        np.testing.assert_array_equal(gathered["label"], split.labels[rows])
        expected = split.images[rows].astype(np.float32) / np.float32(255)
        np.testing.assert_allclose(gathered["image"], expected, rtol=1e-7)


def test_epoch_indices_are_a_permutation_fixed_by_seed_and_epoch():
    a = batching.epoch_indices(100, 32, seed=0, epoch=0)
    assert a.shape == (3, 32) and len(set(a.ravel())) == 96  # The partial batch is dropped.
    np.testing.assert_array_equal(a, batching.epoch_indices(100, 32, seed=0, epoch=0))
    assert not np.array_equal(a, batching.epoch_indices(100, 32, seed=0, epoch=1))


@pytest.mark.slow
def test_several_steps_per_dispatch_equal_single_steps():
    split = make_split()
    mesh = sharding.create_mesh()
    data = device_data.put_split(split, mesh)
    indices = device_data.shard_indices(
        batching.epoch_indices(split.num_examples, 16, 0, 0)[:4], mesh
    )
    rng = jax.random.key(1)
    step = functools.partial(classification.train_step, microbatch_size=0)

    def fresh():
        return create_train_state(
            create_model("SeedCNN"), optax.adam(1e-3), jax.random.key(0), (28, 28, 1)
        )

    multi = jax.jit(functools.partial(steps.multi_step, step))
    scanned, scanned_metrics = multi(fresh(), data, indices, rng)
    single, losses = fresh(), []
    for i in range(4):
        single, metrics = multi(single, data, indices[i : i + 1], rng)
        losses.append(float(metrics["loss"][0]))
    assert int(scanned.step) == int(single.step) == 4
    np.testing.assert_allclose(scanned_metrics["loss"], losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(scanned.params), jax.tree.leaves(single.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_evaluation_on_the_device_equals_eager_evaluation_of_each_batch():
    # Two splits side by side; the second is evaluated in 2 dispatches of 2 batches of 8 and
    # one single batch whose last 3 rows are padding (37 = 4 * 8 + 5).
    first, second = make_split(50, seed=1), make_split(37, seed=2)
    mesh = sharding.create_mesh()
    data, rows = device_data.put_splits([first, second], mesh)
    assert rows == [range(0, 50), range(50, 87)]
    state = create_train_state(
        create_model("SeedCNN"), optax.adam(1e-3), jax.random.key(0), (28, 28, 1)
    )
    multi_eval = jax.jit(functools.partial(steps.multi_eval, classification.eval_step))
    rng = jax.random.key(0)
    metrics, count = steps.evaluate(
        {2: multi_eval, 1: multi_eval}, state, data, rows[1], 8, mesh, rng
    )
    indices, mask = batching.padded_indices(second.num_examples, 8)
    host = steps.mean_metrics(
        [
            classification.eval_step(
                state,
                {
                    "image": second.images[rows].astype(np.float32) / np.float32(255),
                    "label": second.labels[rows],
                    "mask": valid,
                },
            )
            for rows, valid in zip(indices, mask)
        ]
    )
    assert count == 37
    assert metrics.keys() == host.keys()
    for name in host:
        np.testing.assert_allclose(metrics[name], host[name], rtol=1e-5)
