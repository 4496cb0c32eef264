"""Evaluation metrics."""
from vlp_jax.eval.retrieval import rerank_topk, retrieval_metrics

__all__ = ["rerank_topk", "retrieval_metrics"]
