"""Training-step throughput of `configs/user_cnn.py`'s model as traced (plain XLA:CPU) and
through `flaxcnn.cpu.rewrite.rewrite`, taking turns in one process (a shared machine
slows both alike): one jitted Adam step on a random batch, examples/s, median of rounds.

    python scripts/peers/bench_user_cnn_step.py [--batch-sizes 32 128] [--rounds 3]
        [--steps 30] [--batch-norm]
"""

import argparse
import importlib.util
import os
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from flaxcnn.cpu import rewrite as cpu_rewrite

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def user_cnn(**kwargs):
    spec = importlib.util.spec_from_file_location("user_cnn", f"{REPO}/configs/user_cnn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.UserCNN(**kwargs)


def make_step(apply, tx):
    def step(variables, opt_state, x, y, rng):
        def loss(params):
            logits, updates = apply(
                {**variables, "params": params},
                x,
                train=True,
                rngs={"dropout": rng},
                mutable=["batch_stats"],
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates

        grads, updates = jax.grad(loss, has_aux=True)(variables["params"])
        changes, opt_state = tx.update(grads, opt_state)
        params = optax.apply_updates(variables["params"], changes)
        return {**variables, **updates, "params": params}, opt_state

    return jax.jit(step, donate_argnums=(0, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-norm", action="store_true")
    args = parser.parse_args()
    model, tx = user_cnn(batch_norm=args.batch_norm), optax.adam(1e-3)
    contenders = {"plain": model.apply, "rewritten": cpu_rewrite.rewrite(model.apply)}
    for batch_size in args.batch_sizes:
        x = jax.random.uniform(jax.random.key(0), (batch_size, 28, 28, 1))
        y = jnp.arange(batch_size) % 10
        steps, rates = {}, {name: [] for name in contenders}
        for name, apply in contenders.items():
            steps[name] = make_step(apply, tx)
        for _ in range(args.rounds):
            for name in contenders:
                variables = model.init(jax.random.key(1), x)
                opt_state = tx.init(variables["params"])
                variables, opt_state = steps[name](variables, opt_state, x, y, jax.random.key(2))
                jax.block_until_ready(variables)  # Compiled and warm.
                start = time.perf_counter()
                for i in range(args.steps):
                    variables, opt_state = steps[name](
                        variables, opt_state, x, y, jax.random.key(i)
                    )
                jax.block_until_ready(variables)
                rates[name].append(args.steps * batch_size / (time.perf_counter() - start))
        summary = ", ".join(
            f"{name} {statistics.median(r):.0f} ex/s ({', '.join(f'{v:.0f}' for v in r)})"
            for name, r in rates.items()
        )
        print(f"batch {batch_size}: {summary}", flush=True)


if __name__ == "__main__":
    main()
