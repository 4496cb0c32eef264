"""The method-agnostic core: the task contract and registry, train state with named parameter
collections, per-collection optimizers, the update step, the trainer, checkpoints, metrics and
initial weights. Nothing here imports `vlp_jax.methods`."""
