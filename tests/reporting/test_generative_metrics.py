"""Inception score, Frechet distance and the classifier that scores generated images."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from flaxcnn.reporting import generative_metrics as gm


def test_inception_score_of_confident_uniform_predictions_is_the_class_count():
    assert gm.inception_score(np.eye(10)) == pytest.approx(10, rel=1e-9)
    assert gm.inception_score(np.tile(np.eye(4), (3, 1))) == pytest.approx(4, rel=1e-9)


def test_inception_score_of_identical_predictions_is_one():
    probs = np.tile([0.7, 0.2, 0.1], (50, 1))
    assert gm.inception_score(probs) == pytest.approx(1, abs=1e-9)
    assert gm.inception_score(np.full((8, 10), 0.1)) == pytest.approx(1, abs=1e-9)


def test_inception_score_lies_between_one_and_the_class_count():
    probs = np.random.default_rng(0).dirichlet(np.full(10, 0.3), 500)
    assert 1 < gm.inception_score(probs) < 10
    # Two confident classes, equally often: exactly 2.
    assert gm.inception_score(np.array([[1, 0, 0], [0, 1, 0]] * 5)) == pytest.approx(2)


@pytest.mark.parametrize("probs", [np.ones(3), np.zeros((0, 3)), np.array([[1.0, -0.5]])])
def test_inception_score_rejects_bad_probabilities(probs):
    with pytest.raises(ValueError):
        gm.inception_score(probs)


def gaussian(n, mean, cov, seed):
    return np.random.default_rng(seed).multivariate_normal(mean, cov, n)


def test_frechet_distance_of_a_set_to_itself_is_zero():
    feats = gaussian(2000, np.zeros(8), np.diag(np.arange(1.0, 9.0)), 0)
    assert gm.frechet_distance(feats, feats) == pytest.approx(0, abs=1e-6)


def test_frechet_distance_of_shifted_sets_is_the_squared_shift():
    # Equal covariances: the trace terms cancel, leaving ||mu_a - mu_b||^2 exactly (the
    # second set is the first one shifted, so the sample statistics match too).
    rng = np.random.default_rng(1)
    cov = rng.normal(size=(6, 6))
    cov = cov @ cov.T + np.eye(6)
    feats = gaussian(5000, np.zeros(6), cov, 2)
    shift = np.array([1.0, -2.0, 0.5, 0.0, 3.0, 1.0])
    assert gm.frechet_distance(feats, feats + shift) == pytest.approx(np.sum(shift**2), rel=1e-6)


def test_frechet_distance_matches_the_closed_form_of_scaled_gaussians():
    # N(0, I) against N(m, s^2 I) in d dimensions: ||m||^2 + d (1 - s)^2.
    d, s = 4, 2.0
    a = gaussian(20_000, np.zeros(d), np.eye(d), 3)
    b = gaussian(20_000, np.ones(d), s**2 * np.eye(d), 4)
    assert gm.frechet_distance(a, b) == pytest.approx(d + d * (1 - s) ** 2, rel=0.05)


def test_both_matrix_square_root_routes_agree_on_singular_covariances():
    rng = np.random.default_rng(5)
    # Rank 3 in 10 dimensions: sqrtm's result is complex round-off here.
    a, b = rng.normal(size=(20, 3)) @ rng.normal(size=(3, 10)), rng.normal(size=(20, 10))
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eigen = gm._trace_sqrt_product_eigh(cov_a, cov_b)
    assert gm._trace_sqrt_product(cov_a, cov_b) == pytest.approx(eigen, rel=1e-6)
    assert gm.frechet_distance(a, b) >= 0


def test_frechet_distance_rejects_mismatched_features():
    with pytest.raises(ValueError, match="same D"):
        gm.frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))


class TinyClassifier(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Dense(6)(x.reshape(x.shape[0], -1)))
        self.sow("intermediates", gm.FEATURES, x)
        return nn.Dense(3)(x)


class ConvHeadClassifier(nn.Module):
    """Features sown from the middle; the last layer is a 1x1 convolution, not a Dense."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Conv(5, (3, 3))(x))
        self.sow("intermediates", gm.FEATURES, x)
        return nn.Conv(3, (1, 1))(x).mean(axis=(1, 2))


class BrightestChannel(nn.Module):
    """Classifies an image by its brightest channel, with certainty on one-hot images."""

    @nn.compact
    def __call__(self, x, train=False):
        features = x.mean(axis=(1, 2))
        self.sow("intermediates", gm.FEATURES, features)
        return 100.0 * features


def tiny_scorer(batch_size=4):
    model = TinyClassifier()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))
    return gm.Scorer(model.apply, variables, batch_size=batch_size), model, variables


def test_scorer_returns_probabilities_and_penultimate_features_in_batches():
    scorer, model, variables = tiny_scorer()
    images = np.random.default_rng(0).random((10, 4, 4, 1), np.float32)  # 3 batches of 4.
    probs, features = scorer.logits_and_features(images)
    assert probs.shape == (10, 3) and features.shape == (10, 6)
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)
    expected = jax.nn.softmax(model.apply(variables, jnp.asarray(images)))
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
    # The features are the ones the model sows: the hidden relu activations.
    dense_0 = variables["params"]["Dense_0"]
    hidden = np.maximum(images.reshape(10, -1) @ dense_0["kernel"] + dense_0["bias"], 0)
    np.testing.assert_allclose(features, hidden, rtol=1e-5, atol=1e-6)
    # uint8 images are scaled to [0, 1].
    uint8 = np.round(images * 255).astype(np.uint8)
    np.testing.assert_allclose(scorer.logits_and_features(uint8)[0], probs, atol=1e-2)


def test_scorer_features_do_not_depend_on_the_last_layer_class():
    model = ConvHeadClassifier()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))
    images = np.random.default_rng(0).random((3, 4, 4, 1), np.float32)
    _, features = gm.Scorer(model.apply, variables, batch_size=4).logits_and_features(images)
    conv = variables["params"]["Conv_0"]
    hidden = jax.nn.relu(
        jax.lax.conv_general_dilated(
            images, conv["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        + conv["bias"]
    )
    np.testing.assert_allclose(features, np.asarray(hidden).reshape(3, -1), rtol=1e-4, atol=1e-5)


def test_a_scorer_model_that_sows_no_features_is_refused():
    model = nn.Dense(3)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 4)))

    def apply_fn(variables, images, train, mutable):
        return model.apply(variables, images.reshape(len(images), -1), mutable=mutable)

    with pytest.raises(ValueError, match="sow"):
        gm.Scorer(apply_fn, variables).logits_and_features(np.zeros((2, 2, 2, 1), np.float32))


@pytest.mark.slow
def test_the_cnn_sows_its_penultimate_features():
    from flaxcnn.models.cnn import CNN

    model = CNN(num_classes=10, widths=(4, 8))
    variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    scorer = gm.Scorer(model.apply, variables, batch_size=2)
    probs, features = scorer.logits_and_features(np.zeros((3, 28, 28, 1), np.float32))
    assert probs.shape == (3, 10) and features.shape == (3, 7 * 7 * 8)


def test_score_generator_draws_the_samples_asked_for():
    scorer, _, _ = tiny_scorer()
    calls = []

    def generate_fn(rng, num):
        calls.append(num)
        return jax.random.uniform(rng, (num, 4, 4, 1))

    test_images = np.random.default_rng(1).random((9, 4, 4, 1), np.float32)
    scores = gm.score_generator(generate_fn, scorer, test_images, 25, jax.random.key(0), 10)
    assert calls == [10, 10, 5]
    assert set(scores) == {"inception_score", "frechet_distance"}
    assert 1 <= scores["inception_score"] <= 3 and scores["frechet_distance"] >= 0
    # The same rng draws the same samples.
    again = gm.score_generator(generate_fn, scorer, test_images, 25, jax.random.key(0), 10)
    assert again == scores


def test_conditional_accuracy_is_per_class():
    scorer, _, _ = tiny_scorer()
    # Images the scorer gives each class.
    images = np.random.default_rng(2).random((200, 4, 4, 1), np.float32)
    predicted = np.argmax(scorer.logits_and_features(images)[0], 1)
    pick = {c: images[predicted == c][:1] for c in range(3)}
    assert all(len(p) for p in pick.values())

    def generate_fn(rng, labels):  # Right for classes 0 and 2; class 1 draws a 2.
        return np.repeat(pick[min(2 * int(labels[0]), 2)], len(labels), 0)

    result = gm.conditional_accuracy(generate_fn, scorer, 3, per_class=5)
    assert result["per_class_conditional_accuracy"] == [1.0, 0.0, 1.0]
    assert result["conditional_accuracy"] == pytest.approx(2 / 3)


def _run_of(score_samples: int, task):
    import types

    from flaxcnn import default_config

    config = default_config.get_config()
    config.score_samples = score_samples
    return types.SimpleNamespace(config=config, task=task)


def test_samples_are_scored_only_when_asked_and_with_a_scorer(caplog):
    from flaxcnn.runner import loop
    from flaxcnn.tasks import gan

    assert loop.sample_scores(_run_of(0, gan), None, None) == {}
    with caplog.at_level("WARNING"):
        assert loop.sample_scores(_run_of(10, gan), None, None) == {}
    assert "No scorer given" in caplog.text


def test_evaluate_generator_scores_draws_and_each_class():
    scorer = gm.Scorer(BrightestChannel().apply, {}, batch_size=4, test_accuracy=0.5)

    def draw(rng, num, labels=None):
        labels = jnp.zeros((num,), jnp.int32) if labels is None else labels
        return jax.nn.one_hot(labels, 3)[:, None, None, :] * jnp.ones((num, 2, 2, 3))

    real = np.asarray(draw(None, 6, jnp.arange(6) % 3))
    results = gm.evaluate_generator(draw, scorer, real, real, 6, num_classes=3)
    assert results["scorer_test_accuracy"] == 0.5
    assert results["inception_score"] == pytest.approx(1.0, abs=1e-6)  # One class only.
    assert results["real_inception_score"] == pytest.approx(3.0, rel=1e-6)
    assert results["per_class_conditional_accuracy"] == [1.0, 1.0, 1.0]


def test_scorer_workdir_names_the_image_settings():
    from flaxcnn import scoring

    assert scoring.scorer_workdir("/s", "mnist") == "/s/mnist"
    assert scoring.scorer_workdir("/s", "mnist", (32, 32), "rgb") == "/s/mnist_32x32_rgb"


def test_generative_metrics_imports_nothing_above_reporting():
    import subprocess
    import sys

    code = (
        "import sys, flaxcnn.reporting.generative_metrics; "
        "print(sorted(m for m in sys.modules if m.startswith(('flaxcnn.training', "
        "'flaxcnn.tasks', 'flaxcnn.cli', 'flaxcnn.inference', 'flaxcnn.scoring', "
        "'flaxcnn.runner', 'flaxcnn.data'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_only_generative_runs_with_scores_need_a_scorer():
    from flaxcnn import default_config, scoring

    config = default_config.get_config()
    config.score_samples = 100
    assert not scoring.needs_scorer(config)  # A classifier.
    config.task = "gan"
    assert scoring.needs_scorer(config)
    config.score_samples = 0
    assert not scoring.needs_scorer(config)


@pytest.mark.slow
def test_scorer_is_trained_once_then_loaded_like_any_run(data_dir, tmp_path):
    from flaxcnn import scoring

    overrides = {"num_epochs": 1, "num_train_steps": 40, "eval_batch_size": 500}
    workdir = scoring.train_scorer("embedded_mnist", data_dir, str(tmp_path), overrides=overrides)
    assert workdir == str(tmp_path / "embedded_mnist")
    assert scoring.has_scorer(workdir)
    scorer = scoring.load_scorer(workdir)
    assert 0 < scorer.test_accuracy <= 1

    from flaxcnn.data import input_pipeline

    test = input_pipeline.load_split("embedded_mnist", "test", data_dir)
    probs, features = scorer.logits_and_features(test.images[:600])
    assert probs.shape == (600, 10) and features.shape == (600, 576)
    accuracy = np.mean(np.argmax(probs, 1) == test.labels[:600])
    assert accuracy > 0.5  # Forty steps already classify most digits.
    # Real digits of 10 classes, each confidently classified: a high score.
    assert gm.inception_score(probs) > 3

    results = tmp_path / "embedded_mnist" / "results.json"
    mtime = results.stat().st_mtime
    assert scoring.train_scorer("embedded_mnist", data_dir, str(tmp_path)) == workdir
    assert results.stat().st_mtime == mtime  # Not trained again.

    def noise(rng, num):
        return jax.random.uniform(rng, (num, 28, 28, 1))

    real = test.images[:500].astype(np.float32) / 255
    noise_scores = gm.score_generator(noise, scorer, test.images, 500)
    real_scores = gm.score_generator(lambda rng, num: real[:num], scorer, test.images, 500)
    assert real_scores["frechet_distance"] < noise_scores["frechet_distance"]
    assert real_scores["inception_score"] > noise_scores["inception_score"]
