"""Prompting entity modelling (PEM) of ALPRO: regions, prompter soft labels, soft cross-entropy.

Per clip one rectangular region is drawn on the patch grid and used on every frame:
- the frozen prompter sees the frames with everything outside the region zeroed, and its
  similarities to the prompt-ensembled entity embeddings give a soft label (softmax over the
  entities at the prompter's temperature);
- the model predicts that label from the mean of its fused video-patch tokens inside the
  region (see `region_mean`), through the PEM head.

Labels whose top probability is below a threshold (ALPRO: 0.2) are dropped. The official code
compares the argmax *index* with 0.2 instead, which keeps every label except those of entity 0;
here the top probability is compared, as the paper describes. Optionally (`over_uniform`) the
top probability's excess over the uniform 1 / K is compared instead, for small K.

Region rule (ALPRO's `random_erase`, on the patch grid): area fraction `a ~ U(area)`, aspect
`r = h / w ~ U(aspect)`; in patch units `w = floor(sqrt(a * gh * gw / r))`,
`h = floor(sqrt(a * gh * gw * r))` (equal to snapping the pixel sizes down to whole patches).
A draw is accepted when `1 <= w <= gw` and `1 <= h <= gh`; the first accepted of `tries` draws
is used (if none is, the last draw clipped to the grid). The position is uniform among the
grid positions where the region fits. The official code also redraws when a uniformly drawn
corner puts the region partly outside the frame, which slightly favours small regions.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

DEFAULT_AREA = (0.3, 0.5)
DEFAULT_ASPECT = (0.3, 1 / 0.3)
DEFAULT_TRIES = 10


def _check_range(name: str, lo_hi, positive: bool = True) -> tuple[float, float]:
  lo, hi = (float(v) for v in lo_hi)
  if not (0.0 < lo <= hi if positive else lo <= hi):
    raise ValueError(f"pem.{name} must be (lo, hi) with 0 < lo <= hi, got {tuple(lo_hi)}")
  return lo, hi


def regions_from_uniforms(u: jax.Array, grid: tuple[int, int], area=DEFAULT_AREA,
                          aspect=DEFAULT_ASPECT) -> jax.Array:
  """The region rule of this module applied to given uniforms (deterministic).

  Args:
    u: float32 [B, tries, 4] uniforms in [0, 1): area, aspect, top, left of each draw.
    grid: (gh, gw) patch rows and columns of a frame.
    area: (lo, hi) region area as a fraction of the frame.
    aspect: (lo, hi) of height / width.

  Returns:
    int32 [B, 4]: (top, left, height, width) in patches, inside the grid, height and width
    >= 1.
  """
  gh, gw = (int(g) for g in grid)
  if gh < 1 or gw < 1:
    raise ValueError(f"patch grid must be at least 1x1, got {gh}x{gw}")
  if u.ndim != 3 or u.shape[-1] != 4:
    raise ValueError(f"regions_from_uniforms expects uniforms [B, tries, 4], got {u.shape}")
  a_lo, a_hi = _check_range("area", area)
  r_lo, r_hi = _check_range("aspect", aspect)
  u = u.astype(jnp.float32)
  a = a_lo + u[..., 0] * (a_hi - a_lo)
  r = r_lo + u[..., 1] * (r_hi - r_lo)
  cells = a * float(gh * gw)
  w = jnp.floor(jnp.sqrt(cells / r)).astype(jnp.int32)
  h = jnp.floor(jnp.sqrt(cells * r)).astype(jnp.int32)
  ok = (w >= 1) & (w <= gw) & (h >= 1) & (h <= gh)
  tries = u.shape[1]
  # First accepted draw; the last one (clipped below) when none is accepted.
  pick = jnp.where(jnp.any(ok, axis=1), jnp.argmax(ok, axis=1), tries - 1)
  take = lambda x: jnp.take_along_axis(x, pick[:, None], axis=1)[:, 0]
  h = jnp.clip(take(h), 1, gh)
  w = jnp.clip(take(w), 1, gw)
  top = jnp.floor(take(u[..., 2]) * (gh - h + 1).astype(jnp.float32)).astype(jnp.int32)
  left = jnp.floor(take(u[..., 3]) * (gw - w + 1).astype(jnp.float32)).astype(jnp.int32)
  top = jnp.minimum(top, gh - h)  # guards u * n rounding up to n in float32
  left = jnp.minimum(left, gw - w)
  return jnp.stack([top, left, h, w], axis=-1)


def sample_regions(rng: jax.Array, batch: int, grid: tuple[int, int], area=DEFAULT_AREA,
                   aspect=DEFAULT_ASPECT, tries: int = DEFAULT_TRIES) -> jax.Array:
  """One random region per clip: int32 [B, 4] (top, left, height, width) in patches.

  See the module docstring for the rule; `regions_from_uniforms` applies it.
  """
  if tries < 1:
    raise ValueError(f"sample_regions needs tries >= 1, got {tries}")
  u = jax.random.uniform(rng, (batch, tries, 4), jnp.float32)
  return regions_from_uniforms(u, grid, area, aspect)


def region_patch_mask(regions: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """float32 [B, gh * gw]: 1 for the patches inside each region (row-major patch index).

  Row-major is the order of the video encoder's patch tokens: patch (row i, column j) is
  token `1 + i * gw + j` of the encoder output.
  """
  gh, gw = (int(g) for g in grid)
  top, left, h, w = (regions[:, k, None] for k in range(4))
  rows = jnp.arange(gh)[None, :]
  cols = jnp.arange(gw)[None, :]
  in_rows = (rows >= top) & (rows < top + h)  # [B, gh]
  in_cols = (cols >= left) & (cols < left + w)  # [B, gw]
  return (in_rows[:, :, None] & in_cols[:, None, :]).reshape(-1, gh * gw).astype(jnp.float32)


def keep_region(video: jax.Array, regions: jax.Array, patch_size: int) -> jax.Array:
  """Zeroes every pixel of `video` float [B, T, H, W, C] outside its clip's region.

  The same region applies to every frame. Zero is in the normalised input space (the dataset
  mean colour); the official code zeroes the raw pixels (black) before normalising.
  """
  b, _, hgt, wid, _ = video.shape
  p = int(patch_size)
  if hgt % p or wid % p:
    raise ValueError(f"frames of {hgt}x{wid} px do not divide into {p}x{p} patches")
  grid = (hgt // p, wid // p)
  mask = region_patch_mask(regions, grid).reshape(b, *grid)
  mask = jnp.repeat(jnp.repeat(mask, p, axis=1), p, axis=2)  # [B, H, W]
  return video * mask[:, None, :, :, None].astype(video.dtype)


def region_mean(tokens: jax.Array, patch_mask: jax.Array) -> jax.Array:
  """Mean of the patch tokens inside each region.

  Args:
    tokens: float [B, N, D] patch tokens (e.g. fused video tokens without the CLS).
    patch_mask: float/bool [B, N], 1 inside the region (every region has >= 1 patch).

  Returns:
    float32 [B, D].
  """
  if tokens.shape[:2] != patch_mask.shape:
    raise ValueError(f"region_mean: tokens {tokens.shape} do not match the patch mask "
                     f"{patch_mask.shape} ([B, N, D] and [B, N])")
  m = patch_mask.astype(jnp.float32)
  total = jnp.einsum("bnd,bn->bd", tokens.astype(jnp.float32), m)
  return total / jnp.maximum(jnp.sum(m, axis=1, keepdims=True), 1.0)


def soft_labels(sim: jax.Array, temp: jax.Array, threshold: float, over_uniform: bool = False
                ) -> tuple[jax.Array, jax.Array]:
  """Prompter soft labels and which of them are confident enough to train on.

  Args:
    sim: float [B, K] cosine similarities of the region's video feature to the entities.
    temp: float32 scalar prompter temperature.
    threshold: with `over_uniform` False (ALPRO), a label is kept when its top probability is
      >= threshold (ALPRO: 0.2 for K = 1000). With `over_uniform` True, when the top
      probability exceeds the uniform one, 1 / K, by >= threshold; an absolute threshold
      means little for small K (for K = 8 uniform is already 0.125).
    over_uniform: compare `max_prob - 1 / K` instead of `max_prob` with the threshold.

  Returns:
    labels: float32 [B, K], `softmax(sim / temp)`, without gradient.
    keep: bool [B].
  """
  if sim.ndim != 2:
    raise ValueError(f"soft_labels expects similarities [B, K], got {sim.shape}")
  probs = jax.nn.softmax(jax.lax.stop_gradient(sim).astype(jnp.float32) / temp, axis=-1)
  probs = jax.lax.stop_gradient(probs)
  top = jnp.max(probs, axis=-1)
  if over_uniform:
    top = top - 1.0 / sim.shape[-1]
  return probs, top >= threshold


def label_quality(labels: jax.Array, keep: jax.Array, present: jax.Array
                  ) -> dict[str, jax.Array]:
  """How often the prompter's label names an entity known to be in the clip.

  Only kept rows with at least one present entity count: the others are not trained on, or
  have no ground truth to compare with.

  Args:
    labels: float [B, K] teacher probabilities.
    keep: bool [B], the labels trained on (already False for invalid rows).
    present: bool [B, K], True where entity k is known to be in clip b (e.g. named in its
      caption); a row without any True has no ground truth.

  Returns:
    float32 scalars:
      `pem/teacher_acc`: percent (0-100) of counted rows whose argmax label is present;
      `pem/teacher_chance`: percent a uniform guess over the K entities would reach on the
        same rows (mean of `present.sum(-1) / K`, times 100); `teacher_acc` close to it means
        the teacher labels are no better than chance;
      `pem/teacher_rows`: the number of counted rows.
    acc and chance are 0 when no row counts.
  """
  if labels.ndim != 2 or present.shape != labels.shape or keep.shape != labels.shape[:1]:
    raise ValueError(f"label_quality expects labels and present [B, K] and keep [B], got "
                     f"{labels.shape}, {present.shape} and {keep.shape}")
  present = present.astype(bool)
  counted = (keep.astype(bool) & jnp.any(present, axis=-1)).astype(jnp.float32)
  top = jnp.argmax(labels, axis=-1)
  hit = jnp.take_along_axis(present, top[:, None], axis=-1)[:, 0].astype(jnp.float32)
  chance = jnp.sum(present.astype(jnp.float32), axis=-1) / labels.shape[-1]
  rows = jnp.sum(counted)
  n = jnp.maximum(rows, 1.0)  # 0 / 1 = 0 rather than NaN when no row counts
  return {"pem/teacher_acc": 100.0 * jnp.sum(hit * counted) / n,
          "pem/teacher_chance": 100.0 * jnp.sum(chance * counted) / n,
          "pem/teacher_rows": rows}


def pem_loss(logits: jax.Array, labels: jax.Array, keep: jax.Array
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Soft cross-entropy of the PEM head against the prompter's labels.

  Args:
    logits: float [B, K] PEM head outputs.
    labels: float [B, K] soft labels (rows sum to 1).
    keep: bool [B], False for dropped labels (and invalid rows).

  Returns:
    per_sample: float32 [B], `-sum_k labels * log_softmax(logits)`, 0 where not kept. The
      batch loss is `sum(per_sample) / max(sum(keep), 1)` (mean over kept labels).
    metrics: `pem/kept_frac` (share of kept labels), `pem/acc` (argmax agreement with the
      label over kept rows; 0 when none is kept), float32 scalars.
  """
  if logits.shape != labels.shape or logits.ndim != 2 or keep.shape != logits.shape[:1]:
    raise ValueError(f"pem_loss expects logits and labels [B, K] and keep [B], got "
                     f"{logits.shape}, {labels.shape} and {keep.shape}")
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  ce = -jnp.sum(labels.astype(jnp.float32) * logp, axis=-1)
  kept = keep.astype(jnp.float32)
  per_sample = jnp.where(keep, ce, 0.0)
  n = jnp.maximum(jnp.sum(kept), 1.0)
  agree = (jnp.argmax(logits, axis=-1) == jnp.argmax(labels, axis=-1)).astype(jnp.float32)
  return per_sample, {"pem/kept_frac": jnp.mean(kept), "pem/acc": jnp.sum(agree * kept) / n}
