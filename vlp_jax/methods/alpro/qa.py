"""ALPRO video question answering: fused [CLS] of (question, video) -> MLP over K answers.

Task `alpro_qa` (configs/alpro_qa.py). The answer vocabulary (the K most frequent training
answers, `data/answers.py`) gives every question an `answer_idx` in the batch; -1 (out of
vocabulary) is ignored by the loss and counted wrong by the `qa` evaluator.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from vlp_jax import losses
from vlp_jax.core import task as task_lib
from vlp_jax.eval import qa as qa_lib
from vlp_jax.methods.alpro.pretrain import ALPROTask
from vlp_jax.models.alpro import ALPRO, alpro_config

QA_KEYS = ("video", "text_ids", "text_mask", "answer_idx", "valid")


@task_lib.register("alpro_qa")
class ALPROQATask(ALPROTask):
  """ALPRO with the QA head (`model.num_answers` = K); cross-entropy, evaluator `qa`."""

  def __init__(self, config, text):
    num_answers = int(config.model.get("num_answers", 0))
    if num_answers < 1:
      raise ValueError(f"config.task='alpro_qa' needs config.model.num_answers >= 1 (the "
                       f"answer vocabulary size), got {num_answers}")
    task_lib.Task.__init__(self, config, text)
    self.weights = {}
    self.entities = []
    self.model = ALPRO(alpro_config(config.model, text.vocab_size))

  def streams(self) -> dict[str, task_lib.Stream]:
    return {"train": task_lib.Stream(keys=QA_KEYS)}

  def load_frozen(self, mesh, rules, workdir: str) -> None:
    """None: QA fine-tuning has no frozen teacher (PEM is a pre-training loss)."""
    del mesh, rules, workdir
    return None

  def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
    """`ALPROTask.dummy_batch` plus `answer_idx` int32 [B]."""
    return dict(super().dummy_batch(batch_size),
                answer_idx=np.zeros((batch_size,), np.int32))

  def _logits(self, params, batch: dict, rng: jax.Array | None) -> jax.Array:
    """float32 [B, K] answer logits; dropout on when `rng` is given."""
    det = rng is None
    keys = jax.random.split(rng, 3) if rng is not None else (None,) * 3
    video = self._apply(params, ALPRO.encode_video, batch["video"], deterministic=det,
                        rng=keys[0])
    question = self._apply(params, ALPRO.encode_text, batch["text_ids"], batch["text_mask"],
                           deterministic=det, rng=keys[1])
    fused = self._apply(params, ALPRO.fuse, question, batch["text_mask"], video,
                        deterministic=det, rng=keys[2])
    return self._apply(params, ALPRO.qa_logits, fused)

  def loss(self, params, batches, rng, *, train, frozen=None, step=None):
    """Mean cross-entropy over the batch's questions with an in-vocabulary answer.

    Args:
      params: {"model": ALPRO params}.
      batches: {"train": global arrays: video float32 [B,T,H,W,3]; text_ids, text_mask int32
        [B,L] (the question); answer_idx int32 [B] (-1 = out of vocabulary)}.
    Returns:
      (scalar float32 loss, metrics `loss/qa`, `qa/train_acc`, `qa/train_oov` (fraction of
      questions without a target)).
    """
    del frozen
    batch = batches["train"]
    logits = self._logits(params["model"], batch, rng if train else None)
    ce, weight, metrics = losses.qa_loss(logits, batch["answer_idx"])
    loss = jnp.sum(ce) / jnp.maximum(jnp.sum(weight), 1.0)
    metrics["loss/qa"] = loss
    metrics["qa/train_oov"] = 1.0 - jnp.mean(weight)
    return loss, metrics

  def _evaluate_qa(self, params, batches, mesh, rules, eval_cfg
                   ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """`eval.qa.evaluate` of the answer logits (accuracy, OOV share, confusion matrix)."""
    del eval_cfg
    return qa_lib.evaluate(self._eval_logits, params["model"], batches, mesh, rules,
                           answers=self.text.answers, num_answers=self.model.config.num_answers)

  @functools.cached_property
  def _eval_logits(self):
    return lambda params, batch: self._logits(params, batch, None)

  def evaluators(self) -> dict[str, task_lib.Evaluator]:
    """`qa`: answer accuracy over the answer vocabulary."""
    return {"qa": self._evaluate_qa}
