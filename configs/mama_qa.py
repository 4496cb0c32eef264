"""MAMA video question answering: ALPRO's QA model, per-sample loss = answer cross-entropy +
`mama.contrastive_weight` x the angular-margin loss between each clip and its question, weighted
by the meta-learned weighting net.

  python -m launch.train --config=configs/mama_qa.py:demo --workdir=runs/mama_qa \
      [--config.init.checkpoint=runs/pretrain] [--config.meta.enabled=False]

The answer vocabulary, `qa/accuracy` and `qa/oov` are those of `configs/alpro_qa.py`. The meta
set (`meta.split`, default `val`) must hold questions too; `python -m launch.meta_set` builds a
balanced one from the training data.

Presets (the backbone's fine-tuning settings are ALPRO's, see configs/alpro_qa.py; margin 0.05
as in MAMA's QA code):
  tiny       unit tests (synthetic corpus with generated questions, seconds).
  demo       the synthetic corpus with the demo model.
  msrvtt_qa  MSRVTT-QA (1500 answers); msvd_qa: MSVD-QA (2423 answers); base = msrvtt_qa.
"""
from configs import alpro_qa
from configs.mama_retrieval import add_mama
from vlp_jax import config as config_lib

# ALPRO parameters QA does not use: no updates, no optimizer state (VTC's `temp` is replaced
# by MAMA's `logit_scale`).
UNUSED = r"(vtm_head|mlm_head|pem_head|temp)(/.*)?"


def base():
  c = alpro_qa.base()
  c.task = "mama_qa"
  add_mama(c, margin=0.05)
  c.mama.contrastive_weight = 1.0  # 0 = weighted cross-entropy alone
  c.optim.model.frozen = UNUSED
  return c


PRESETS = dict(alpro_qa.PRESETS)


def get_config(arg=None):
  return config_lib.build(arg, PRESETS, base)
