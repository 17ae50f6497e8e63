"""Runtime: the device mesh and sharding, jax.distributed start-up."""
