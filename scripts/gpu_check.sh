#!/usr/bin/env bash
# On a machine with an NVIDIA GPU (and `pip install -e '.[cuda,test]'`): the step tests and
# flaxcnn's part of the benchmark, on the GPU, in a few minutes.
#
#   bash scripts/gpu_check.sh            # real MNIST from ../shared/data, or set TFDS_DATA_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=cuda
python -c 'import jax; print("devices:", jax.devices())'
python -m pytest -q -p no:xdist tests/test_classification.py tests/test_layers.py
python scripts/benchmark.py --trainers flaxcnn --batch-sizes 32 128 --repeats 3 \
    --tfds "${TFDS_DATA_DIR:-../shared/data/tfds}" --out benchmark/gpu
