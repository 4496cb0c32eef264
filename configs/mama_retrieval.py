"""MAMA text-video retrieval: angular-margin contrastive loss + meta-learned sample weights.

  python -m launch.train --config=configs/mama_retrieval.py:demo --workdir=runs/mama \
      [--config.init.checkpoint=runs/pretrain] [--config.mama.margin=0.1]

`backbone` = `alpro` (ALPRO's dual encoder: video and text encoders with their projections) or
`clip` (CLIP's image tower on every frame, mean-pooled over time, and its text tower; sizes in
`clip`, or all of it from a transformers CLIPModel directory with `init.clip=hf:DIR`):

  python -m launch.train --config=configs/mama_retrieval.py:demo --config.backbone=clip \
      --workdir=runs/mama_clip

The weighting net is trained every `meta.every` steps through one virtual SGD step
(`meta.virtual_lr`) on batches of `meta.split`, a clean split held out of training (never an
evaluation split); `meta.enabled=False` trains with the plain angular-margin loss.

Presets: `tiny` (unit tests), `demo` (the synthetic corpus, the demo model), `base` (MSRVTT:
CLIP B/32 towers over 12 frames; set `data.dir`, `meta.split`, `init.clip` and `data.vocab`),
`lab` (the synthetic lab of `python -m launch.mama_lab`: long-tailed topics, a small model).
"""
import ml_collections

from configs import alpro_pretrain, alpro_retrieval
from vlp_jax import config as config_lib

# Parameters of the ALPRO model the dual encoder does not use: no updates, no optimizer state.
UNUSED = r"(fusion_encoder|vtm_head|mlm_head|qa_head|pem_head|temp)(/.*)?"


def add_mama(c: ml_collections.ConfigDict, *, margin: float) -> None:
  """MAMA's sections (`mama`, `meta`, `optim.weight_net`) on a backbone's config."""
  c.backbone = "alpro"
  c.mama = ml_collections.ConfigDict(dict(
      margin=margin,          # mu, radians in [0, pi/2]; 0 = InfoNCE
      logit_scale_init=4.60,  # s = exp(logit_scale), clamped to [1, 200]
      close_negatives=False,  # the released code's rule: negatives within mu also get it
  ))
  c.meta = ml_collections.ConfigDict(dict(
      enabled=True,
      split="val",            # the meta set: clean, balanced, held out of training
      exclude_ids="",         # its clip ids, left out of `train`; "" = DIR/<split>.ids.txt
                              # when `python -m launch.meta_set` wrote it
      batch_size=0,           # 0 = batch_size
      every=1,                # meta-update period (steps)
      virtual_lr=1e-3,        # alpha of the virtual SGD step
      normalize="sum",        # weights normalised by their sum, or "l2" (the official code)
      hidden=64,              # weighting net width (MAMA: 64, Meta-Weight-Net: 100)
      gradient="exact",       # "exact" (through the virtual step) or "first_order"
      remat=False,            # recompute the virtual step in the meta backward pass
      curve_max_loss=16.0,    # the report's weight curve w(l) spans l in [0, this]
  ))
  # Meta-Weight-Net's weighting-net optimizer: Adam, lr 1e-3, weight decay 1e-4 (decoupled).
  c.optim.weight_net = ml_collections.ConfigDict(dict(
      lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4, warmup_frac=0.0, end_lr_frac=1.0,
      clip_norm=0.0, frozen="", lr_mult=()))


def base() -> ml_collections.ConfigDict:
  c = alpro_retrieval.base()
  c.task = "mama_retrieval"
  c.loss = ml_collections.ConfigDict(dict(vtc=0.0, vtm=0.0, mlm=0.0, pem=0.0))
  add_mama(c, margin=0.1)
  # backbone="clip": CLIP ViT-B/32 sizes (MAMA's retrieval backbone is CLIP-ViP B/32); the
  # image tower runs at data.image_size, the text tower reads data.max_text_len tokens.
  c.clip = ml_collections.ConfigDict(dict(
      text=dict(hidden=512, layers=12, heads=8, mlp_dim=2048, max_position=77),
      vision=dict(patch_size=32, hidden=768, layers=12, heads=12, mlp_dim=3072),
      projection_dim=512, hidden_act="quick_gelu"))
  c.init.clip = ""              # "hf:DIR": a local transformers CLIPModel (backbone="clip")
  c.optim.model.frozen = UNUSED
  for ev in c.evals.values():
    ev.rerank_k = 0
  return c


def _small_clip(c, *, patch_size, hidden, layers, heads):
  """A from-scratch CLIP as wide and deep as the preset's ALPRO towers."""
  tower = dict(hidden=hidden, layers=layers, heads=heads, mlp_dim=4 * hidden)
  c.clip.text.update(max_position=max(int(c.data.max_text_len), 16), **tower)
  c.clip.vision.update(patch_size=patch_size, **tower)
  c.clip.projection_dim = int(c.model.embed_dim)


def _tiny(c):
  alpro_retrieval.PRESETS["tiny"](c)
  c.evals.test.rerank_k = 0
  _small_clip(c, patch_size=16, hidden=32, layers=2, heads=2)


def _demo(c):
  alpro_retrieval.PRESETS["demo"](c)
  for ev in c.evals.values():
    ev.rerank_k = 0
  _small_clip(c, patch_size=8, hidden=128, layers=4, heads=4)


def _base(c):
  """MSRVTT 1k-A as MAMA's retrieval: CLIP B/32 towers over 12 frames (start from a CLIP
  checkpoint: --config.init.clip=hf:DIR --config.data.vocab=DIR, its tokenizer); the data,
  steps and optimiser of ALPRO's MSRVTT preset (configs/alpro_retrieval.py)."""
  alpro_retrieval.PRESETS["base"](c)
  c.backbone = "clip"
  c.data.num_frames = 12
  for ev in c.evals.values():
    ev.rerank_k = 0


def _lab(c):
  """`launch.mama_lab`'s runs: a long-tailed corpus and a small model, minutes per run."""
  alpro_retrieval.PRESETS["tiny"](c)
  c.data.synthetic.update(num_train=2048, num_val=256, num_test=256, num_test_unseen=16,
                          num_images=0, num_frames=4, image_size=32, num_shards=2,
                          topic_zipf=1.0, caption_noise=0.0)
  c.data.update(num_frames=4, image_size=32, shuffle_buffer=1024, max_text_len=16)
  c.model.video.update(image_size=32, patch_size=8, num_frames=4, hidden=64, layers=2, heads=2,
                       mlp_dim=128)
  c.model.text.update(hidden=64, layers=3, fusion_layer=2, heads=2, mlp_dim=128)
  c.model.embed_dim = 64
  c.optim.model.update(lr=1e-3, warmup_frac=0.05, clip_norm=5.0)
  c.batch_size = 32
  c.eval_batch_size = 64
  c.num_steps = 500
  c.log_every = 50
  c.ckpt_every = 500
  c.evals = ml_collections.ConfigDict({"test": alpro_pretrain.retrieval_eval(
      "test")})
  _small_clip(c, patch_size=8, hidden=64, layers=2, heads=2)


PRESETS = {"tiny": _tiny, "demo": _demo, "base": _base, "lab": _lab}


def get_config(arg=None):
  return config_lib.build(arg, PRESETS, base)
