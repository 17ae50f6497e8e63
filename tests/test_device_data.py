"""The device-resident training split: the batches gathered on the device are the host
pipeline's, and several steps per dispatch compute what single steps do."""

import functools

import jax
import numpy as np
import optax

from flaxcnn import device_data, input_pipeline, sharding, train
from flaxcnn.models import create_model
from flaxcnn.state import create_train_state
from flaxcnn.tasks import classification


def make_split(n=96, seed=0) -> input_pipeline.Split:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
    return input_pipeline.Split(images, rng.integers(0, 10, n).astype(np.int32), 10)


def test_gathered_batches_equal_the_host_pipelines():
    split = make_split()
    mesh = sharding.create_mesh()
    data = device_data.put_split(split, mesh)
    indices = device_data.epoch_indices(split.num_examples, 16, seed=3, epoch=1)
    assert indices.shape == (6, 16) and indices.dtype == np.int32
    host = list(input_pipeline.train_batches(split, 16, seed=3, epoch=1))
    for step, batch in enumerate(host):
        gathered = jax.jit(device_data.gather_batch)(data, indices[step])
        np.testing.assert_array_equal(gathered["label"], batch["label"])
        np.testing.assert_allclose(gathered["image"], batch["image"], rtol=1e-7)


def test_epoch_indices_are_a_permutation_fixed_by_seed_and_epoch():
    a = device_data.epoch_indices(100, 32, seed=0, epoch=0)
    assert a.shape == (3, 32) and len(set(a.ravel())) == 96  # The partial batch is dropped.
    np.testing.assert_array_equal(a, device_data.epoch_indices(100, 32, seed=0, epoch=0))
    assert not np.array_equal(a, device_data.epoch_indices(100, 32, seed=0, epoch=1))


def test_several_steps_per_dispatch_equal_single_steps():
    split = make_split()
    mesh = sharding.create_mesh()
    data = device_data.put_split(split, mesh)
    indices = device_data.shard_indices(
        device_data.epoch_indices(split.num_examples, 16, 0, 0)[:4], mesh
    )
    rng = jax.random.key(1)
    step = functools.partial(classification.train_step, microbatch_size=0)

    def fresh():
        return create_train_state(
            create_model("SeedCNN"), optax.adam(1e-3), jax.random.key(0), (28, 28, 1)
        )

    multi = jax.jit(functools.partial(train.multi_step, step))
    scanned, scanned_metrics = multi(fresh(), data, indices, rng)
    single, losses = fresh(), []
    for i in range(4):
        single, metrics = multi(single, data, indices[i : i + 1], rng)
        losses.append(float(metrics["loss"][0]))
    assert int(scanned.step) == int(single.step) == 4
    np.testing.assert_allclose(scanned_metrics["loss"], losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(scanned.params), jax.tree.leaves(single.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
