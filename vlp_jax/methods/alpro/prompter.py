"""PEM's frozen teacher: the prompter's encoders and its prompt-ensembled entity embeddings.

The prompter is an ALPRO model of the same encoders trained with VTC only (a separate run:
`configs/alpro_prompter.py`, or the `prompter` stage that `python -m launch.train` runs first
for a pre-training config with `pem.prompter = ""`). Loading it never trains anything: a
missing or unfinished prompter is an error naming the stage that makes it.
"""
from __future__ import annotations

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import PartitionSpec as P

from vlp_jax.core import checkpoint as ckpt_lib
from vlp_jax.core import init as init_lib
from vlp_jax.core.task import Frozen
from vlp_jax.data import entities as entities_lib
from vlp_jax.data import text as text_lib
from vlp_jax.models.alpro import ALPRO
from vlp_jax.models.layers import l2_normalize
from vlp_jax.parallel import sharding as shd

SUBDIR = "prompter"  # WORKDIR/prompter: where `pem.prompter = ""` looks
_PROMPT_CHUNK = 512  # prompts encoded per step of the one-off entity embedding
_KEEP = ("video_encoder", "vision_proj", "temp")  # what the loss reads of the prompter


def prompter_dir(config, workdir: str | None) -> str:
  """The prompter run's WORKDIR: `pem.prompter`, or "" = WORKDIR/prompter."""
  if config.pem.prompter:
    return os.path.abspath(config.pem.prompter)
  if workdir is None:
    raise ValueError("pem.prompter is '' (= WORKDIR/prompter) but no workdir was given; set "
                     "pem.prompter to a prompter run's WORKDIR")
  return os.path.join(os.path.abspath(workdir), SUBDIR)


def _check_ready(config, path: str) -> None:
  step = ckpt_lib.latest_step(path)
  if config.pem.prompter:
    if step is None:
      raise FileNotFoundError(f"pem.prompter={config.pem.prompter!r} holds no checkpoint "
                              f"(looked in {ckpt_lib.checkpoint_dir(path)!r})")
    return
  want = int(config.pem.prompter_steps)
  if step is None or step < want:
    raise FileNotFoundError(
        f"PEM's prompter in {path!r} is at step {step or 0} of pem.prompter_steps={want}. "
        "`python -m launch.train` with this config trains it first (its `prompter` stage); "
        "or train configs/alpro_prompter.py and set pem.prompter to that run's WORKDIR")


def load_teacher(task, mesh, rules, workdir: str | None) -> Frozen:
  """The frozen pytree PEM reads.

  Loads the prompter (`pem.prompter`; with `data.source='random'`, the throughput benchmark,
  and `pem.prompter` = "" a seeded untrained prompter), encodes the 12 video and 12 image
  prompts of every entity once, and keeps what the loss needs.

  Returns:
    Frozen with params = {"prompter": its video_encoder, vision_proj and temp params,
    "entities_video", "entities_image": float32 [K, E], the L2-normalised mean of the
    normalised prompt features (random unit vectors with `data.source='random'`, which has no
    tokenizer)}; the entity axis is the logical axis `entities`.
  """
  config = task.config
  init_fn = functools.partial(task.init_module, task.prompter)
  if config.data.source == "random" and not config.pem.prompter:
    # Benchmark data has nothing to learn: a seeded fresh prompter exercises PEM's compute.
    key = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), 0x9E7)
    params, shardings = shd.sharded_init(init_fn, key, mesh, rules)
    logging.info("PEM: random data, untrained prompter")
  else:
    path = prompter_dir(config, workdir)
    _check_ready(config, path)
    step = int(config.pem.step)
    params, shardings = init_lib.load_run_params(path, init_fn, mesh, rules, step=step)
    logging.info("PEM: prompter from %s (step %s), %d entities", path,
                 ckpt_lib.latest_step(path) if step < 0 else step,
                 task.model.config.num_entities)
  ent_shd = nn.logical_to_mesh_sharding(P("entities", None), mesh, rules)
  video, image = _entity_features(task, params, mesh, rules, ent_shd)
  frozen = {"prompter": {k: params[k] for k in _KEEP}, "entities_video": video,
            "entities_image": image}
  frozen_shd = {"prompter": {k: shardings[k] for k in _KEEP}, "entities_video": ent_shd,
                "entities_image": ent_shd}
  return Frozen(frozen, frozen_shd)


def _prompt_tokens(task) -> tuple[np.ndarray, np.ndarray]:
  """int32 ids and mask [24 K, L] of the video then image prompts (template-major)."""
  prompts = entities_lib.prompts(
      task.entities, entities_lib.VIDEO_TEMPLATES + entities_lib.IMAGE_TEMPLATES)
  ids, mask = text_lib.tokenize(task.text.tokenizer, prompts, 64)
  length = int(mask.sum(axis=1).max())  # right-padded: cut to the longest prompt
  return ids[:, :length], mask[:, :length]


def _entity_features(task, params, mesh, rules, sharding) -> tuple[jax.Array, jax.Array]:
  """(video, image) entity embeddings float32 [K, E] from the prompter's text tower."""
  k = task.model.config.num_entities
  e = task.model.config.embed_dim
  if task.config.data.source == "random":
    rng = np.random.default_rng([int(task.config.seed), 0xE7])
    feats = rng.standard_normal((2, k, e)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=-1, keepdims=True)
    return tuple(jax.make_array_from_callback((k, e), sharding, lambda i, f=f: f[i])
                 for f in feats)
  ids, mask = _prompt_tokens(task)
  n = ids.shape[0]
  chunk = min(n, _PROMPT_CHUNK)
  pad = -n % chunk  # whole chunks; the padding rows repeat row 0 and are cut off
  ids = np.concatenate([ids, np.repeat(ids[:1], pad, 0)]).reshape(-1, chunk, ids.shape[1])
  mask = np.concatenate([mask, np.repeat(mask[:1], pad, 0)]).reshape(ids.shape)
  rep = shd.replicated(mesh)
  ids, mask = (jax.make_array_from_callback(x.shape, rep, lambda i, x=x: x[i])
               for x in (ids, mask))
  num_video = len(entities_lib.VIDEO_TEMPLATES)
  model = task.prompter

  def embed(params, ids, mask):
    def one(x):
      tokens = model.apply({"params": params}, *x, method=ALPRO.encode_text)
      return model.apply({"params": params}, tokens, method=ALPRO.text_feature)
    feats = jax.lax.map(one, (ids, mask)).reshape(-1, e)[:n].reshape(-1, k, e)
    # Ensemble: mean of the normalised features of a set's templates, normalised again.
    return l2_normalize(jnp.mean(feats[:num_video], 0)), l2_normalize(
        jnp.mean(feats[num_video:], 0))

  with shd.activate(mesh, rules):
    return jax.jit(embed, out_shardings=(sharding, sharding))(params, ids, mask)
