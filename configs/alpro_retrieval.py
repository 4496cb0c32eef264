"""ALPRO text-video retrieval fine-tuning: VTC + VTM (no MLM, no PEM).

  python -m launch.train --config=configs/alpro_retrieval.py:demo --workdir=runs/ret \
      [--config.init.checkpoint=runs/pretrain]

Evaluation ranks by VTC similarity and re-ranks each query's top `evals.<name>.rerank_k`
candidates by VTC logit + VTM log-odds (both directions); `retrieval/...` holds the
re-ranked metrics, `retrieval_vtc/...` the VTC-only ones.

Presets:
  tiny     unit tests (synthetic corpus, seconds).
  demo     the README walkthrough on the synthetic corpus (same model as
           `alpro_pretrain.py:demo`, so `init.checkpoint` can name a demo pre-training run).
  msrvtt   paper: MSRVTT 1k-A test, 8 frames, lr 2.5e-5, 5 epochs, batch 64.
  didemo   paper: DiDeMo paragraph-to-video, 8 frames, lr 4e-5, 10 epochs, batch 96.
  base     = msrvtt.
The paper presets read `data.dir` (what `python -m launch.ingest --format=msrvtt|didemo`
writes, with `train` and `test` splits) and start from `init.checkpoint` (an ALPRO
pre-training WORKDIR) when set, else from a fresh init.
"""
import math

import ml_collections

from configs import alpro_pretrain
from vlp_jax import config as config_lib


def base():
  c = alpro_pretrain.base()
  c.loss.update(mlm=0.0, pem=0.0)
  c.data.image_ratio = 0.0  # video-text pairs only (no image batches)
  c.evals.test.rerank_k = 128
  return c


def _finetune(c, *, lr, warmup_frac=0.1, clip_norm, weight_decay=1e-3):
  """ALPRO's fine-tuning optimiser (official configs): AdamW, 10 % warm-up, linear decay."""
  c.optim.model.update(lr=lr, warmup_frac=warmup_frac, end_lr_frac=0.0, clip_norm=clip_norm,
                       weight_decay=weight_decay)


def _paper(c, *, num_frames, max_text_len, batch_size, epochs, train_pairs, lr, clip_norm):
  c.data.synthetic.generate = False
  c.data.update(num_frames=num_frames, max_text_len=max_text_len, image_size=224,
                train_sampling="rand", eval_sampling="uniform")
  # The time embedding keeps the pre-training's 4 frames (so `init.checkpoint` matches in
  # shape); the model interpolates it to the input's frame count.
  c.model.video.num_frames = 4
  c.model.text.dropout = 0.1
  _finetune(c, lr=lr, clip_norm=clip_norm)
  c.batch_size = batch_size
  # Steps = epochs over the (video, text) training pairs, as the official code counts them.
  c.num_steps = math.ceil(epochs * train_pairs / batch_size)
  c.eval_batch_size = 64
  c.evals = ml_collections.ConfigDict({"test": alpro_pretrain.retrieval_eval("test",
                                                                             rerank_k=128)})
  c.ckpt_every = 1000
  c.log_every = 50


def _msrvtt(c):
  # 8 GPUs x 8 (config_release/msrvtt_ret.json); the 9k training videos x 20 captions that
  # `launch.ingest --format=msrvtt --video_list=MSRVTT_train.9k.csv` writes.
  _paper(c, num_frames=8, max_text_len=40, batch_size=64, epochs=5, train_pairs=180_000,
         lr=2.5e-5, clip_norm=5.0)


def _didemo(c):
  # 8 GPUs x 12 (didemo_ret.json); 8,395 training videos, one paragraph each.
  _paper(c, num_frames=8, max_text_len=50, batch_size=96, epochs=10, train_pairs=8_395,
         lr=4e-5, clip_norm=20.0)


def _tiny(c):
  alpro_pretrain.PRESETS["tiny"](c)
  c.evals.test.rerank_k = 4
  c.num_steps = 6
  c.log_every = 3
  c.ckpt_every = 6


def _demo(c):
  # The demo pre-training's model and corpus, fine-tuned with VTC + VTM for 300 steps.
  alpro_pretrain.PRESETS["demo"](c)
  _finetune(c, lr=2.5e-4, clip_norm=5.0)
  c.pem.warm_start = False  # fine-tuning starts from init.checkpoint (or fresh), no prompter
  c.order.steps = 0  # nor an order stage
  for ev in c.evals.values():
    ev.update(rerank_k=16, every=0)
  c.num_steps = 300
  c.log_every = 25
  c.ckpt_every = 300


PRESETS = {"tiny": _tiny, "demo": _demo, "msrvtt": _msrvtt, "didemo": _didemo, "base": _msrvtt}


def get_config(arg=None):
  return config_lib.build(arg, PRESETS, base)
