"""Retrieval evaluation of a dual encoder: rank by feature similarity (both directions),
contrast-probe accuracy, and the arrays `launch.report` plots. Methods build their retrieval
evaluators on these (ALPRO adds VTM re-ranking on top)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlp_jax.eval import blockwise, features
from vlp_jax.eval import retrieval as retrieval_lib

SHOWN_PAIRS = 32  # the report's similarity heat-map size


def probe_metrics(feats: dict, class_names: Callable[[], list[str] | None] | None = None
                  ) -> dict[str, float]:
  """Metrics of the contrast probes, over the clips that have one ({} without probes).

  `feats`: L2-normalised `video` [N,E], `probe` [N,2,E] (the clip's caption; the same caption
  with the opposite motion), bool `has_probe` [N]; optionally `video_reversed` [N,E] (the
  clip's frames in reverse order). Returns `contrast_acc` (percent of clips whose video is
  closer to the first probe than to the second), `probe_cos` (mean cosine of the two probes),
  `clip_cos` (mean cosine of two different clips, with 2+ clips) and, with `video_reversed`,
  `reversal_cos` (mean cosine of a clip and its reversal). A cosine near 1 says that tower
  does not tell the two directions apart: contrastive training drives the text tower there
  when the video tower cannot (and vice versa). How near is relative to `clip_cos`:
  (1 - reversal_cos) / (1 - clip_cos) is the video tower's order sensitivity against the
  spread of its features over clips.

  With an int32 `label` [N] (the clip's class, -1 = none) the same metrics also come per
  class, over the probe clips of that class: `contrast_acc/<class>`, `probe_cos/<class>` and
  `reversal_cos/<class>`, where <class> is `class_names()[label]` with spaces as "_"
  (`class_names` is called only when some probe clip has a label; without names, the label
  index). Contrastive training can learn one motion's direction and leave another's at
  chance, which the overall figure hides.
  """
  if "probe" not in feats or not bool(jnp.any(feats["has_probe"])):
    return {}
  has = feats["has_probe"]
  n = jnp.sum(has)
  probe = feats["probe"].astype(jnp.float32)
  video = feats["video"].astype(jnp.float32)
  scores = jnp.einsum("be,bke->bk", video, probe)
  # Per clip [N]; the split's figures are their means over the probe clips.
  per_clip = {"contrast_acc": 100.0 * (scores[:, 0] > scores[:, 1]).astype(jnp.float32),
              "probe_cos": jnp.sum(probe[:, 0] * probe[:, 1], -1)}
  if "video_reversed" in feats:
    per_clip["reversal_cos"] = jnp.sum(video * feats["video_reversed"].astype(jnp.float32), -1)
  out = {k: float(jnp.sum(jnp.where(has, x, 0.0)) / n) for k, x in per_clip.items()}
  if int(n) >= 2:
    # Sum over ordered pairs i != j of v_i . v_j = |sum v|^2 - sum |v_i|^2: no [N, N] matrix.
    v = jnp.where(has[:, None], video, 0.0)
    total = jnp.sum(v, 0)
    pairs = jnp.sum(total * total) - jnp.sum(v * v)
    out["clip_cos"] = float(pairs / (n * (n - 1)))
  if "label" in feats:
    out.update(_per_class(per_clip, has, feats["label"], class_names))
  return out


def _per_class(per_clip: dict, has, label, class_names) -> dict[str, float]:
  """`<metric>/<class>`: the mean of each per-clip metric [N] over the probe clips (`has`
  [N] bool) of each class in `label` [N] int (-1 = none); see `probe_metrics`."""
  label = np.asarray(jax.device_get(label)).astype(np.int64)
  has = np.asarray(jax.device_get(has)).astype(bool)
  classes = np.unique(label[has & (label >= 0)])
  if classes.size == 0:
    return {}
  names = class_names() if class_names is not None else None
  per_clip = {k: np.asarray(jax.device_get(v), np.float64) for k, v in per_clip.items()}
  out = {}
  for c in classes:
    if names is not None and c >= len(names):
      raise ValueError(f"a probe clip has label {c}, but the class list has {len(names)} names")
    name = str(c) if names is None else names[c].replace(" ", "_")
    rows = has & (label == c)
    out.update({f"{k}/{name}": float(np.mean(v[rows])) for k, v in per_clip.items()})
  return out


def report_arrays(feats: dict, scan: dict) -> dict[str, np.ndarray]:
  """`similarity` float32 [n, n] of the first n <= 32 pairs; `t2v_rank`, `v2t_rank` int32 (the
  VTC ranks of `blockwise.scan`, v2t over the videos with a text)."""
  shown = min(feats["text"].shape[0], SHOWN_PAIRS)
  head = jax.device_get(jnp.einsum("te,ve->tv", feats["text"][:shown].astype(jnp.float32),
                                   feats["video"][:shown].astype(jnp.float32)))
  return {"similarity": np.asarray(head, np.float32), "t2v_rank": scan["t2v"],
          "v2t_rank": scan["v2t"][scan["has_text"]]}


def evaluate(embed: Callable[[Any, dict], dict], params, batches, mesh, rules, *,
             block: int = 2048) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """Similarity ranking over one pass of an eval loader (text i describes video i).

  Args:
    embed: (params, batch) -> {"video": [B,E], "text": [B,E]} L2-normalised features, plus
      `probe` [B,2,E] and `has_probe` [B] when the batch carries contrast probes (and
      optionally `video_reversed` [B,E], see `probe_metrics`).
    block: texts per similarity block (`eval/blockwise.py`).
  Returns:
    (metrics `retrieval/t2v_R@1`, ... and with probes `retrieval/contrast_acc`, `probe_cos`,
    `clip_cos` (and `reversal_cos`), see `probe_metrics`; arrays as
    `report_arrays`: `similarity` of the first 32 pairs, `t2v_rank`, `v2t_rank`).
  """
  feats = features.collect(embed, params, batches, mesh, rules)
  n = feats["text"].shape[0]
  gt = np.arange(n)
  # Block by block (eval/blockwise.py): the [N, N] matrix is never formed.
  scan = blockwise.scan(feats["text"], feats["video"], gt, mesh, rules, block=block)
  metrics = retrieval_lib.metrics_from_ranks(scan["t2v"], scan["v2t"], scan["has_text"])
  out = {f"retrieval/{k}": v for k, v in metrics.items()}
  out.update({f"retrieval/{k}": v for k, v in probe_metrics(feats).items()})
  return out, report_arrays(feats, scan)
