"""ALPRO's retrieval evaluator: rank by VTC similarity, re-rank the top k by VTM, contrast probes.

`config.evals.<name> = dict(type="retrieval", split=..., every=..., rerank_k=K)`: with K > 0
the top-k of every query (both directions) are re-ranked by VTM (ALPRO's evaluation);
`retrieval/...` then holds the re-ranked metrics and `retrieval_vtc/...` the VTC-only ones.

The re-ranking score adds the two heads' logits: `sim / temperature` (VTC's logit for the pair)
`+ VTM log-odds` (match minus no-match logit), i.e. the product of the two heads' odds. A raw
`sim + positive logit` sum is dominated by VTM (over a top 16, cosines vary by ~0.1, logits
by ~0.7), so a VTM head weaker than VTC overrides it. Ranks are computed as
`sim + temperature * log-odds` (the same order, with a positive temperature) so the VTC top-k
and its similarities are reused as is.
Ranks and candidates come block by block (eval/blockwise.py), so no [N, N] similarity matrix
is formed at any size.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from vlp_jax.eval import blockwise, dual_encoder, features, rerank
from vlp_jax.eval import retrieval as retrieval_lib
from vlp_jax.models import layers
from vlp_jax.models.alpro import ALPRO
from vlp_jax.parallel import sharding as shd


class RetrievalEvaluator:
  """`evaluator(params, batches, mesh, rules, eval_cfg) -> metrics` for an ALPRO module.

  Args:
    model: the ALPRO module whose `model` collection is evaluated.
    pairs_per_call: about how many fused pairs one VTM re-ranking call scores.
    class_names: () -> the data's class names (or None), for the per-class contrast-probe
      metrics (`dual_encoder.probe_metrics`); called only when probe clips carry labels.
  """

  def __init__(self, model: ALPRO, pairs_per_call: int,
               class_names: Callable[[], list[str] | None] | None = None):
    self.model = model
    self.pairs_per_call = int(pairs_per_call)
    self.class_names = class_names

  def _apply(self, params, method, *args):
    return self.model.apply({"params": params}, *args, method=method)

  def _features(self, params, batch, tokens: bool) -> dict[str, jax.Array]:
    """float32 features `video`, `text` [B,E]; with `tokens` also `video_tokens` [B,1+N,D],
    `text_tokens` [B,L,D], `text_mask` [B,L]; with contrast probes in the batch `probe`
    [B,2,E], `has_probe` bool [B], `video_reversed` [B,E] (the clip played backwards) and
    `label` int32 [B] (the clip's class, -1 = none) when the batch has one."""
    video = self._apply(params, ALPRO.encode_video, batch["video"])
    text = self._apply(params, ALPRO.encode_text, batch["text_ids"], batch["text_mask"])
    out = {"video": self._apply(params, ALPRO.video_feature, video),
           "text": self._apply(params, ALPRO.text_feature, text)}
    if tokens:  # what VTM re-ranking fuses later
      out.update(video_tokens=video, text_tokens=text, text_mask=batch["text_mask"])
    if "probe_ids" in batch:
      b, _, length = batch["probe_ids"].shape
      probe = self._apply(params, ALPRO.encode_text, batch["probe_ids"].reshape(2 * b, length),
                          batch["probe_mask"].reshape(2 * b, length))
      out["probe"] = self._apply(params, ALPRO.text_feature, probe).reshape(b, 2, -1)
      out["has_probe"] = batch["has_probe"]
      # The same frames in reverse order: `reversal_cos` (dual_encoder.probe_metrics).
      reversed_video = self._apply(params, ALPRO.encode_video, batch["video"][:, ::-1])
      out["video_reversed"] = self._apply(params, ALPRO.video_feature, reversed_video)
      if "label" in batch:  # per-class probe metrics
        out["label"] = batch["label"]
    return out

  @functools.cached_property
  def _embed(self):
    return functools.partial(self._features, tokens=False)

  @functools.cached_property
  def _embed_tokens(self):
    return functools.partial(self._features, tokens=True)

  @functools.cached_property
  def _vtm_pair_score(self):
    """Jitted (params, text_tokens, text_mask, video_tokens, text_rows, video_rows) ->
    float32 [P]: temperature x VTM log-odds of the fused pairs (text_rows[p], video_rows[p]),
    the score added to their VTC similarity."""
    def score(params, text_tokens, text_mask, video_tokens, text_rows, video_rows):
      pairs = lambda x: layers.constrain(x, ("batch",) + (None,) * (x.ndim - 1))
      fused = self._apply(params, ALPRO.fuse, pairs(text_tokens[text_rows]),
                          pairs(text_mask[text_rows]), pairs(video_tokens[video_rows]))
      logits = self._apply(params, ALPRO.vtm_logits, fused)
      return self._apply(params, ALPRO.temperature) * (logits[:, 1] - logits[:, 0])
    return jax.jit(score)

  def __call__(self, params, batches, mesh, rules, eval_cfg
               ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Retrieval over one pass of an eval loader (text i describes video i).

    Args:
      params: {"model": ALPRO params}.
      eval_cfg: the `config.evals.<name>` entry (`rerank_k`, default 0).
    Returns:
      (metrics, arrays). metrics: the DESIGN keys (`retrieval/t2v_R@1`, ...; re-ranked when
      re-ranking is on, and then also the VTC-only ranks under `retrieval_vtc/...`), plus
      `retrieval/contrast_acc` (percent of clips whose video is closer to its probe caption
      than to the altered one), `retrieval/probe_cos`, `retrieval/clip_cos` and
      `retrieval/reversal_cos`, and the same per class of the probe clips
      (`retrieval/contrast_acc/<class>`, ...; `dual_encoder.probe_metrics`) when the split
      carries contrast probes. arrays (saved for `launch.report`): `similarity` float32 [n, n], the
      VTC similarities of the first n <= 32 (text, video) pairs; `t2v_rank`, `v2t_rank`
      int32, every query's VTC rank.
    """
    params = params["model"]
    k = int(eval_cfg.get("rerank_k", 0))
    if k > 0:
      rows, keep = features.collect_rows(self._embed_tokens, params, batches, mesh, rules)
      wanted = ("video", "text", "probe", "has_probe", "video_reversed", "label")
      feats = features.take({n: v for n, v in rows.items() if n in wanted}, keep, mesh)
    else:
      feats = features.collect(self._embed, params, batches, mesh, rules)
    gt = np.arange(feats["text"].shape[0])
    # Block by block (eval/blockwise.py): the [N, N] matrix is never formed; with re-ranking
    # the scan also keeps every query's top-k candidates.
    scan = blockwise.scan(feats["text"], feats["video"], gt, mesh, rules, k=k)
    vtc = retrieval_lib.metrics_from_ranks(scan["t2v"], scan["v2t"], scan["has_text"])
    if k > 0:
      keep_d = jnp.asarray(keep, jnp.int32)

      def pair_score(text_idx, video_idx):
        with shd.activate(mesh, rules):
          score = self._vtm_pair_score(params, rows["text_tokens"], rows["text_mask"],
                                       rows["video_tokens"], keep_d[text_idx.reshape(-1)],
                                       keep_d[video_idx.reshape(-1)])
        return score.reshape(text_idx.shape)

      # About `pairs_per_call` fused pairs per call, evenly split over the batch shards.
      chunk = rerank.rows_per_chunk(self.pairs_per_call, k, features.batch_shards(mesh, rules))
      out = {f"retrieval/{n}": v
             for n, v in rerank.reranked_metrics(scan, pair_score, chunk).items()}
      out.update({f"retrieval_vtc/{n}": v for n, v in vtc.items()})
    else:
      out = {f"retrieval/{n}": v for n, v in vtc.items()}
    out.update({f"retrieval/{k}": v
                for k, v in dual_encoder.probe_metrics(feats, self.class_names).items()})
    return out, dual_encoder.report_arrays(feats, scan)
