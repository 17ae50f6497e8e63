"""One 3x3 'same' convolution's training work (forward, and the gradients of its input and
kernel) as flaxcnn runs it (jax.jit through the CPU rewrite: oneDNN's kernels), with XLA's
own kernels, and in TensorFlow (tf.function, Keras's backend: oneDNN on CPUs), at the shapes
of flaxcnn's `CNN` on MNIST: how fast each runs the same FLOPs.

    python scripts/peers/conv_speed.py [--batch-size 128] [--repeats 20]

Prints GFLOP/s per shape and the ratio; the families benchmark's CNN row is bound by these.
"""

import argparse
import functools
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

# (height, width, input channels, output channels) of the CNN's convolutions after the first.
SHAPES = [(28, 28, 16, 16), (14, 14, 16, 32), (14, 14, 32, 32)]


def median_seconds(fn, repeats: int) -> float:
    fn()  # Compiles (and warms caches).
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def jax_step(x: np.ndarray, kernel: np.ndarray, rewritten: bool):
    """Compiled as flaxcnn compiles its steps (`cpu_rewrite.compile_for_this_backend`), with the
    convolution through `cpu_rewrite.rewrite` (`rewritten`) or as XLA has it."""
    import jax

    from flaxcnn.cpu import rewrite as cpu_rewrite

    def conv(x, kernel):
        layout = ("NHWC", "HWIO", "NHWC")
        return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=layout)

    if rewritten:
        conv = cpu_rewrite.rewrite(conv)

    def loss(x, kernel):
        y = conv(x, kernel)
        return (y * y).sum()

    x, kernel = jax.device_put(x), jax.device_put(kernel)
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, kernel)
    grad = cpu_rewrite.compile_for_this_backend(lowered)
    return lambda: jax.block_until_ready(grad(x, kernel))


def tf_step(x: np.ndarray, kernel: np.ndarray):
    import tensorflow as tf

    x, kernel = tf.constant(x), tf.Variable(kernel)

    @tf.function
    def grad():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.nn.conv2d(x, kernel, 1, "SAME")
            loss = tf.reduce_sum(y * y)
        return tape.gradient(loss, [x, kernel])

    return lambda: [g.numpy() for g in grad()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(
        "| shape (B, H, W, Cin -> Cout) | flaxcnn GFLOP/s | XLA's own GFLOP/s "
        "| TensorFlow GFLOP/s | flaxcnn / TF |"
    )
    print("| --- | --- | --- | --- | --- |")
    steps = [
        functools.partial(jax_step, rewritten=True),
        functools.partial(jax_step, rewritten=False),
        tf_step,
    ]
    for height, width, cin, cout in SHAPES:
        x = rng.standard_normal((args.batch_size, height, width, cin), np.float32)
        kernel = rng.standard_normal((3, 3, cin, cout), np.float32)
        # Forward, input gradient and kernel gradient: three convolutions' worth.
        flops = 3 * 2 * args.batch_size * height * width * 9 * cin * cout
        rates = [flops / median_seconds(step(x, kernel), args.repeats) / 1e9 for step in steps]
        print(
            f"| {args.batch_size}, {height}, {width}, {cin} -> {cout} | {rates[0]:.1f} "
            f"| {rates[1]:.1f} | {rates[2]:.1f} | {rates[0] / rates[2]:.2f}x |"
        )


if __name__ == "__main__":
    main()
