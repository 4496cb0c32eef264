"""ALPRO video question answering: MLP over the fused [CLS] of (question, video), cross-entropy.

  python -m launch.train --config=configs/alpro_qa.py:demo --workdir=runs/qa \
      [--config.init.checkpoint=runs/pretrain]

The answer vocabulary is the `model.num_answers` most frequent answers of the training split
(ties alphabetical), written to WORKDIR/answers.json on first use. `qa/accuracy` counts every
test question; those whose answer is outside the vocabulary count wrong (`qa/oov` = their
share).

Presets:
  tiny       unit tests (synthetic corpus with generated questions, seconds).
  demo       the README walkthrough (same model as `alpro_pretrain.py:demo`).
  msrvtt_qa  paper: 16 frames with remat, lr 5e-5, 1500 answers, 10 epochs, batch 192.
  msvd_qa    paper: 16 frames with remat, lr 5e-5, 2423 answers, 15 epochs, batch 192.
  base       = msrvtt_qa.
The paper presets read `data.dir` (what `python -m launch.ingest --format=msrvtt_qa|msvd_qa`
writes: records with aligned `question/string` / `answer/string`, splits `train` and `test`).
"""
import math

import ml_collections

from configs import alpro_pretrain
from vlp_jax import config as config_lib


def base():
  c = alpro_pretrain.base()
  c.task = "alpro_qa"
  c.model.num_answers = 1500
  c.loss.update(vtc=0.0, vtm=0.0, mlm=0.0, pem=0.0)  # pre-training losses: unused here
  c.data.image_ratio = 0.0  # video questions only (no image batches)
  c.evals = ml_collections.ConfigDict({"test": qa_eval("test")})
  return c


def qa_eval(split: str, every: int = 0) -> ml_collections.ConfigDict:
  """A `config.evals` entry of the QA evaluator (answer accuracy) on `split`."""
  return ml_collections.ConfigDict(dict(type="qa", split=split, every=every))


def _paper(c, *, num_answers, epochs, train_questions, clip_norm):
  c.data.synthetic.generate = False
  c.model.num_answers = num_answers
  c.data.update(num_frames=16, max_text_len=40, image_size=224, train_sampling="rand",
                eval_sampling="uniform")
  c.model.video.num_frames = 4  # pre-training's time embedding, interpolated to 16 frames
  c.model.remat = "full"        # 16 frames: gradient checkpointing, as ALPRO
  c.model.text.dropout = 0.1
  # 8 GPUs x 12 x 2 accumulation steps (config_release/msrvtt_qa.json, msvd_qa.json).
  c.batch_size = 192
  c.optim.grad_accum = 2
  c.optim.model.update(lr=5e-5, warmup_frac=0.1, end_lr_frac=0.0, clip_norm=clip_norm,
                       weight_decay=1e-3)
  c.num_steps = math.ceil(epochs * train_questions / c.batch_size)
  c.eval_batch_size = 64
  c.evals = ml_collections.ConfigDict({"test": qa_eval("test")})
  c.ckpt_every = 1000
  c.log_every = 50


def _msrvtt_qa(c):
  _paper(c, num_answers=1500, epochs=10, train_questions=158_581, clip_norm=5.0)


def _msvd_qa(c):
  _paper(c, num_answers=2423, epochs=15, train_questions=30_933, clip_norm=20.0)


def _tiny(c):
  alpro_pretrain.PRESETS["tiny"](c)
  c.model.num_answers = 8  # small: some test answers are out of vocabulary
  c.evals = ml_collections.ConfigDict({"test": qa_eval("test")})
  c.num_steps = 6
  c.log_every = 3
  c.ckpt_every = 6


def _demo(c):
  # The demo pre-training's model and corpus; 4 questions per clip.
  alpro_pretrain.PRESETS["demo"](c)
  c.data.reverse_twins.rate = 0.0  # a reversed clip would keep its question's direction answer
  c.pem.warm_start = False  # fine-tuning starts from init.checkpoint (or fresh), no prompter
  c.order.steps = 0  # nor an order stage
  c.model.num_answers = 32  # every colour, shape, motion, size and count + a few rare answers
  c.optim.model.update(lr=2.5e-4, warmup_frac=0.1, clip_norm=5.0, weight_decay=1e-3)
  c.evals = ml_collections.ConfigDict({n: qa_eval(n) for n in ("test", "test_unseen")})
  c.num_steps = 300
  c.log_every = 25
  c.ckpt_every = 300


PRESETS = {"tiny": _tiny, "demo": _demo, "msrvtt_qa": _msrvtt_qa, "msvd_qa": _msvd_qa,
           "base": _msrvtt_qa}


def get_config(arg=None):
  return config_lib.build(arg, PRESETS, base)
