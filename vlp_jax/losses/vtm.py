"""Video-text matching (VTM) of ALPRO: hard-negative sampling and the 2-way matching loss.

For each text one negative video, and for each video one negative text, are drawn from the
VTC similarities with the positive masked out, so similar-but-wrong pairs are drawn more
often. The fusion encoder then scores B positive and 2B negative pairs; labels are
`[1] * B + [0] * 2B` (class 1 = matched).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def hard_negative_sharpness(step: jax.Array, num_steps: int, hard_from: float = 0.0,
                            ramp: float = 0.0, max_sharpness: float = 1.0) -> jax.Array:
  """float32 scalar in [0, max_sharpness]: how hard VTM's negatives are at `step`.

  0 = uniformly random negatives, 1 = ALPRO's (sampled by VTC similarity); linear from 0 at
  `hard_from * num_steps` to `max_sharpness` at `(hard_from + ramp) * num_steps` (fractions of
  training).
  Random negatives first let the VTM head learn from what the encoders already tell apart:
  hard negatives of a from-scratch model differ only in what it cannot see yet.
  """
  progress = jnp.asarray(step, jnp.float32) / max(int(num_steps), 1)
  if ramp <= 0:
    return (progress >= hard_from).astype(jnp.float32) * max_sharpness
  return jnp.clip((progress - hard_from) / ramp, 0.0, 1.0) * max_sharpness


def sample_hard_negatives(rng: jax.Array, logits_t2v: jax.Array, sharpness: jax.Array = 1.0,
                          twin: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Draws one hard negative video per text and one hard negative text per video.

  Text `i` gets video `j != i` with probability `softmax(logits_t2v[i])_j` renormalised
  over `j != i`; video `j` gets text `i != j` with probability
  `softmax(logits_t2v[:, j])_i` renormalised over `i != j`. No gradient flows into the
  logits (sampling is a discrete choice, as in ALPRO's `torch.no_grad` block).

  Args:
    rng: a PRNG key.
    logits_t2v: float [B, B] text-to-video logits (rows = texts), e.g. from `vtc_loss`.
    sharpness: float scalar multiplying the logits (`hard_negative_sharpness`): 1 = ALPRO,
      0 = uniform over the non-matching pairs, in between a tempered softmax.
    twin: optional int32 [B], row r's time-reversed twin is row r + twin[r] (0 = none, as
      `twin_negatives`); twins are masked out like the positive, so that only
      `twin_negatives` decides how many negatives are twins.

  Returns:
    neg_video_for_text: int32 [B], a video index `!= i` for each text `i`.
    neg_text_for_video: int32 [B], a text index `!= j` for each video `j`.

  Raises:
    ValueError: if `logits_t2v` is not square, B < 2 (no negative exists), or B < 3 with
      `twin` (a row and its twin leave none).
  """
  if logits_t2v.ndim != 2 or logits_t2v.shape[0] != logits_t2v.shape[1]:
    raise ValueError(
        f"sample_hard_negatives expects square logits [B, B], got {tuple(logits_t2v.shape)}")
  b = logits_t2v.shape[0]
  if b < 2:
    raise ValueError(
        f"sample_hard_negatives needs a batch of at least 2 pairs to find a negative, got B={b}")
  logits = jax.lax.stop_gradient(logits_t2v).astype(jnp.float32) * sharpness
  # -inf on the diagonal: the positive gets probability exactly 0 and the rest is the
  # renormalised softmax (categorical samples by Gumbel-max, which handles -inf).
  excluded = jnp.eye(b, dtype=bool)
  if twin is not None:
    if b < 3:
      raise ValueError(f"sample_hard_negatives with twins needs a batch of at least 3, got B={b}")
    # Twins pair up both ways (r + twin[r] has offset -twin[r]), so one mask serves both
    # directions: entry [r, r + twin[r]] for every row with a twin.
    rows = jnp.arange(b)
    excluded = excluded | ((rows[None, :] == (rows + twin)[:, None]) & (twin != 0)[:, None])
  masked = jnp.where(excluded, -jnp.inf, logits)
  key_v, key_t = jax.random.split(rng)
  neg_video_for_text = jax.random.categorical(key_v, masked, axis=1)
  neg_text_for_video = jax.random.categorical(key_t, masked, axis=0)
  return neg_video_for_text.astype(jnp.int32), neg_text_for_video.astype(jnp.int32)


def twin_negatives(rng: jax.Array, twin: jax.Array, neg_video: jax.Array, neg_text: jax.Array,
                   prob: float) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """Replaces sampled VTM negatives by time-reversed twins, each with probability `prob`.

  A twin is the same clip played backwards with its direction words swapped, so the pair
  (text i, twin's video) and (twin's text, video i) differ from the positive only in the
  direction of time: negatives that the VTM head can reject only by reading frame order.

  Args:
    rng: a PRNG key.
    twin: int32 [B], row r's twin is row r + twin[r]; 0 = no twin.
    neg_video, neg_text: int32 [B], the sampled negatives (`sample_hard_negatives`).
    prob: in [0, 1], chance that a row with a twin takes it, drawn independently for the
      negative video and the negative text.

  Returns:
    neg_video, neg_text: int32 [B]; `{"vtm/twin_frac"}`: float32, share of the 2B negatives
      that are twins.
  """
  b = twin.shape[0]
  partner = jnp.arange(b, dtype=jnp.int32) + twin.astype(jnp.int32)
  draw = jax.random.uniform(rng, (2, b)) < prob
  use = draw & (twin != 0)[None]
  neg_video = jnp.where(use[0], partner, neg_video).astype(jnp.int32)
  neg_text = jnp.where(use[1], partner, neg_text).astype(jnp.int32)
  # Drawn or sampled: a sampler that does not exclude twins picks them too.
  is_twin = (jnp.stack([neg_video, neg_text]) == partner[None]) & (twin != 0)[None]
  return neg_video, neg_text, {"vtm/twin_frac": jnp.mean(is_twin.astype(jnp.float32))}


def _pair_ce(logits: jax.Array, label: int) -> jax.Array:
  """Cross-entropy [B] of 2-way logits [B, 2] against a constant label, in float32."""
  return -jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)[:, label]


def vtm_loss(logits_pos: jax.Array, logits_neg_video: jax.Array,
             logits_neg_text: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Video-text matching cross-entropy over B positive and 2B negative pairs.

  Args:
    logits_pos: float [B, 2], VTM head on (text i, video i); label 1.
    logits_neg_video: float [B, 2], VTM head on (text i, its hard negative video); label 0.
    logits_neg_text: float [B, 2], VTM head on (video i, its hard negative text); label 0.

  Returns:
    per_sample: float32 [B], mean of the three cross-entropies that belong to sample i,
      so `mean(per_sample)` equals ALPRO's mean CE over all 3B pairs.
    metrics: `vtm/acc`: float32 scalar, argmax accuracy over all 3B pairs (0-1).
  """
  shapes = [tuple(x.shape) for x in (logits_pos, logits_neg_video, logits_neg_text)]
  if len(set(shapes)) != 1 or len(shapes[0]) != 2 or shapes[0][1] != 2:
    raise ValueError(f"vtm_loss expects three [B, 2] logit arrays, got {shapes}")
  ce_pos = _pair_ce(logits_pos, 1)
  ce_neg_video = _pair_ce(logits_neg_video, 0)
  ce_neg_text = _pair_ce(logits_neg_text, 0)
  per_sample = (ce_pos + ce_neg_video + ce_neg_text) / 3.0

  correct = jnp.concatenate([
      jnp.argmax(logits_pos, axis=-1) == 1,
      jnp.argmax(logits_neg_video, axis=-1) == 0,
      jnp.argmax(logits_neg_text, axis=-1) == 0,
  ])
  metrics = {"vtm/acc": jnp.mean(correct.astype(jnp.float32))}
  return per_sample, metrics
