"""Generative runs that score their samples (`score_samples` > 0) under a tiny scorer: the
VAE's and the GAN's sample scores, the scale of real images, and a conditional model's
accuracy per class, as the loop writes them to results.json."""

import json
import math
import pathlib

import pytest

from flaxcnn import api, run_files, scoring
from flaxcnn import config as config_lib

REPO = pathlib.Path(__file__).resolve().parents[2]

TINY = {
    "vae_mnist_conditional": [("model_kwargs.latent_dim", "4"), ("model_kwargs.widths", "(4,8)")],
    "gan_mnist_conditional": [
        ("model_kwargs.latent_dim", "8"),
        ("model_kwargs.generator_widths", "(8,4)"),
        ("model_kwargs.discriminator_widths", "(4,8)"),
    ],
}
SCORES = ("inception_score", "frechet_distance", "real_inception_score", "real_frechet_distance")


@pytest.fixture(scope="module")
def scorer_dir(data_dir, tmp_path_factory) -> str:
    """A scorer of the embedded dataset, trained for a few steps."""
    path = str(tmp_path_factory.mktemp("scorers"))
    scoring.train_scorer(
        "embedded_mnist", data_dir, path, overrides={"num_train_steps": 30, "steps_per_dispatch": 1}
    )
    return path


@pytest.fixture(scope="module")
def scorer_accuracy(scorer_dir) -> float:
    workdir = scoring.scorer_workdir(scorer_dir, "embedded_mnist")
    return json.loads((pathlib.Path(workdir) / run_files.RESULTS).read_text())["test_accuracy"]


@pytest.mark.parametrize("name", TINY)
def test_a_conditional_generative_run_scores_its_samples(
    name, data_dir, scorer_dir, scorer_accuracy, tmp_path
):
    overrides = [
        ("dataset", "embedded_mnist"),
        ("data_dir", data_dir),
        ("num_train_steps", "4"),
        ("steps_per_dispatch", "1"),  # One compiled step: the quickest to compile.
        ("validation_split", ""),  # Scores are the test's: no validation to compile.
        ("test_split", "test[:300]"),
        ("iw_samples", "0"),  # The VAE's importance-weighted estimate: not what is tested.
        ("score_samples", "200"),
        ("scorer_dir", scorer_dir),
        *TINY[name],
    ]
    config = config_lib.load(str(REPO / "configs" / f"{name}.py"), overrides)
    results = api.fit(config=config, workdir=str(tmp_path))
    assert all(math.isfinite(results[key]) for key in SCORES), results
    # Real images score as a generator of perfect samples would; 4 steps of training do not.
    assert results["real_inception_score"] > results["inception_score"] >= 1.0
    assert results["real_frechet_distance"] < results["frechet_distance"]
    assert results["scorer_test_accuracy"] == scorer_accuracy
    assert 0.0 <= results["conditional_accuracy"] <= 1.0
    assert len(results["per_class_conditional_accuracy"]) == 10
