"""The train state: named parameter collections, one optimizer state each, a step and a key."""
from __future__ import annotations

from typing import Any
from collections.abc import Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import optax

from vlp_jax.parallel import sharding as shd


@flax.struct.dataclass
class TrainState:
  """step: int32 []; params / opt_state: {collection: float32 pytree}; rng: uint32 [2] base key.

  The per-step key is `fold_in(rng, step)`, so the stored key never changes and a resumed run
  draws exactly the random numbers of an uninterrupted one. A collection (or the leaves of one)
  frozen in `config.optim` has no optimizer state.
  """
  step: jax.Array
  params: dict[str, Any]
  opt_state: dict[str, Any]
  rng: jax.Array


def init_state(init_collections: Callable[[jax.Array], dict[str, Any]],
               optimizers: Mapping[str, optax.GradientTransformation],
               rng: jax.Array) -> TrainState:
  """Builds the state; params may be logically boxed, the optimizer state mirrors the boxes.

  Raises:
    ValueError: the collections and the optimizers name different sets.
  """
  init_rng, train_rng = jax.random.split(rng)
  params = init_collections(init_rng)
  if set(params) != set(optimizers):
    raise ValueError(f"parameter collections {sorted(params)} but optimizers for "
                     f"{sorted(optimizers)}")
  opt_state = {name: optimizers[name].init(p) for name, p in params.items()}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                    rng=train_rng)


def create_sharded_state(init_collections, optimizers, rng, mesh, rules
                         ) -> tuple[TrainState, Any]:
  """Creates the train state directly in its sharded layout (never whole on one device).

  Returns:
    (state, state_shardings) where the shardings come from the params' logical axis names.
  """
  return shd.sharded_init(lambda r: init_state(init_collections, optimizers, r), rng, mesh,
                          rules)
