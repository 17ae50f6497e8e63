"""Peak memory of a streaming run does not grow with its training split: the same run on a
folder of 600 and of 2,400 photographs (96x96 RGB, 17 and 66 MB decoded) peaks within
`MARGIN_MB` (14 MB apart, measured), where the in-memory path, which holds every decoded
image, grows by 89 MB and fails this test."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

SMALL, LARGE = 600, 2400  # Training images; the test split stays 40.
SIZE = 96
MARGIN_MB = 40
# The child's peak resident set (Linux: KB), measured by the process that waited for it.
PEAK_RSS = (
    "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def write_photos(root, train: int, test: int = 40) -> str:
    """root/{train,test}/{a,b}/<i>.jpg: noise photographs, class b brighter."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("test", test)):
        for i in range(count):
            label = "ab"[i % 2]
            os.makedirs(root / split / label, exist_ok=True)
            pixels = rng.integers(0, 160, (SIZE, SIZE, 3)) + (80 if label == "b" else 0)
            Image.fromarray(pixels.astype(np.uint8)).save(root / split / label / f"{i}.jpg")
    return str(root)


def peak_rss_mb(folder: str, workdir, input_mode: str) -> float:
    command = [
        sys.executable, "-m", "flaxcnn.main", f"--workdir={workdir}",
        f"--config.dataset=folder:{folder}", f"--config.input={input_mode}",
        "--config.validation_split=", "--config.test_split=test",
        "--config.batch_size=32", "--config.num_train_steps=30", "--config.log_every_steps=10",
    ]  # fmt: skip
    # A compilation cache of its own: both runs compile alike (a cached program peaks lower).
    cache = str(workdir) + "-jax-cache"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": cache}
    result = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, *command],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return int(result.stdout.split()[-1]) / 1024


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="not on this platform: ru_maxrss in KB")
def test_peak_memory_of_a_streaming_run_does_not_grow_with_its_split(tmp_path):
    small = write_photos(tmp_path / "small", SMALL)
    large = write_photos(tmp_path / "large", LARGE)
    peaks = {
        name: peak_rss_mb(folder, tmp_path / f"run-{name}", "stream")
        for name, folder in (("small", small), ("large", large))
    }
    assert abs(peaks["large"] - peaks["small"]) < MARGIN_MB, peaks
