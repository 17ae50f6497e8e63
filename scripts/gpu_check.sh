#!/usr/bin/env bash
# On a machine with an NVIDIA GPU (and `pip install -e '.[cuda,test]'`): the step tests and
# flaxcnn's part of the benchmarks (the seed model, then every family), on the GPU.
#
#   bash scripts/gpu_check.sh            # real MNIST from ../shared/data, or set TFDS_DATA_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=cuda
python -c 'import jax; print("devices:", jax.devices())'
python -m pytest -q -p no:xdist tests/tasks/test_classification.py tests/models/test_layers.py
python scripts/benchmark.py --trainers flaxcnn --batch-sizes 32 128 --repeats 3 \
    --tfds "${TFDS_DATA_DIR:-../shared/data/tfds}" --out benchmark/gpu
python scripts/benchmark_families.py --contenders flaxcnn --epochs 0.25 --repeats 3 \
    --command-repeats 1 --user-model-repeats 1 --tfds "${TFDS_DATA_DIR:-../shared/data/tfds}" \
    --out benchmark/gpu
