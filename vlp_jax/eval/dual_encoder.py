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


def contrast_accuracy(feats: dict) -> float | None:
  """Percent of clips whose video is closer to its probe caption than to the altered one;
  None without probes. `feats`: `video` [N,E], `probe` [N,2,E], `has_probe` bool [N]."""
  if "probe" not in feats or not bool(jnp.any(feats["has_probe"])):
    return None
  scores = jnp.einsum("be,bke->bk", feats["video"], feats["probe"])
  right = (scores[:, 0] > scores[:, 1]) & feats["has_probe"]
  return float(100.0 * jnp.sum(right) / jnp.sum(feats["has_probe"]))


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
      `probe` [B,2,E] and `has_probe` [B] when the batch carries contrast probes.
    block: texts per similarity block (`eval/blockwise.py`).
  Returns:
    (metrics `retrieval/t2v_R@1`, ... and `retrieval/contrast_acc` with probes, arrays as
    `report_arrays`: `similarity` of the first 32 pairs, `t2v_rank`, `v2t_rank`).
  """
  feats = features.collect(embed, params, batches, mesh, rules)
  n = feats["text"].shape[0]
  gt = np.arange(n)
  # Block by block (eval/blockwise.py): the [N, N] matrix is never formed.
  scan = blockwise.scan(feats["text"], feats["video"], gt, mesh, rules, block=block)
  metrics = retrieval_lib.metrics_from_ranks(scan["t2v"], scan["v2t"], scan["has_text"])
  out = {f"retrieval/{k}": v for k, v in metrics.items()}
  acc = contrast_accuracy(feats)
  if acc is not None:
    out["retrieval/contrast_acc"] = acc
  return out, report_arrays(feats, scan)
