"""CLIP pre-training (Prompt-CLIP's frozen backbone): image-text InfoNCE, trained in-repo.

  python -m launch.train --config=configs/clip_pretrain.py:demo --workdir=runs/clip
  python -m launch.export --workdir=runs/clip --out=runs/clip/hf   # a transformers CLIPModel

Task `clip_pretrain` (vlp_jax/methods/prompt_clip/clip_pretrain.py): CLIP's ViT image tower and
causal text tower (`model`), symmetric InfoNCE over the global batch on still images (one-frame
clips of `data.train_split`, default `images`); `data.num_frames` = 1. With a video
`data.train_split` each clip contributes `data.num_frames` frames, mean-pooled; with
`data.image_ratio` > 0 whole batches of `data.image_split` are mixed in.

The tokenizer: `data.vocab` = "" reads DATA_DIR/clip_tokenizer/, a CLIP byte-level BPE that
is learned from the captions of `data.clip_tokenizer.splits` when the directory is missing
(vlp_jax/data/clip_tokenizer.py); or set `data.vocab` to a transformers tokenizer directory.
The text tower's vocabulary is the tokenizer's; `model.text.max_position` must be at least
`data.max_text_len`.

Presets: `tiny` (unit tests, seconds), `demo` (about 8 minutes on 2 CPU cores; the synthetic
"moving shapes" corpus generated into WORKDIR/data, 40 px), `base` (CLIP ViT-B/16 sizes, 224 px,
context 77; set `data.dir` to image-text records with an `images` split, e.g.
`python -m launch.ingest --split=images`).
"""
import math

import ml_collections

from configs import alpro_pretrain
from vlp_jax import config as config_lib


def base() -> ml_collections.ConfigDict:
  c = alpro_pretrain.base()
  c.task = "clip_pretrain"
  for section in ("loss", "pem", "vtm_negatives"):  # ALPRO's objectives
    del c[section]
  c.data.update(
      train_split="images",     # still images (one-frame clips)
      num_frames=1,             # a still image is one frame; video clips: frames mean-pooled
      image_size=224,
      max_text_len=77,          # CLIP's context
      mlm_prob=0.0,
      image_ratio=0.0,          # > 0: whole batches of data.image_split mixed into the stream
      crop_scale=(0.9, 1.0))    # OpenCLIP's random-resized-crop range
  # With data.vocab = "": DATA_DIR/clip_tokenizer/, learned from these splits' captions (those
  # the data directory holds) when missing; at most vocab_size ids (openai's: 49408).
  c.data.clip_tokenizer = ml_collections.ConfigDict(dict(vocab_size=49408,
                                                         splits=("images", "train")))
  # CLIP ViT-B/16 (HF `CLIPConfig` sizes); the image tower runs at data.image_size.
  c.model = ml_collections.ConfigDict(dict(
      vision=dict(patch_size=16, hidden=768, layers=12, heads=12, mlp_dim=3072),
      text=dict(vocab_size=0,   # read by data.source="random" only; else the tokenizer's
                hidden=512, layers=12, heads=8, mlp_dim=2048,
                max_position=77),  # text position table, >= data.max_text_len
      projection_dim=512,
      hidden_act="quick_gelu",
      logit_scale_init=math.log(1 / 0.07),  # temperature 1 / exp(logit_scale), CLIP's 0.07
      max_logit_scale=math.log(100.0),      # CLIP clamps exp(logit_scale) at 100
      # "hf": HF CLIP's init (width- and depth-scaled normals; a small tower's features then
      # depend on its input from the start), "flax": the modules' own (normal 0.02).
      init_scheme="hf",
      dtype="float32",          # compute dtype; params stay float32
      attention="xla",          # xla | cudnn (bfloat16 only)
      remat="none"))
  c.init = ml_collections.ConfigDict(dict(checkpoint="", step=-1))
  # OpenCLIP's AdamW (b2 0.98, eps 1e-6, decay 0.2 on matrices and embeddings).
  c.optim.model = ml_collections.ConfigDict(dict(
      lr=5e-4, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2, warmup_frac=0.05, end_lr_frac=0.0,
      clip_norm=0.0, frozen="", lr_mult=(), no_decay=""))
  c.evals = ml_collections.ConfigDict({"test": retrieval_eval("test", every=5000)})
  return c


def retrieval_eval(split: str, every: int = 0) -> ml_collections.ConfigDict:
  """A `config.evals` entry of the `retrieval` evaluator (frames mean-pooled) on `split`."""
  return ml_collections.ConfigDict(dict(type="retrieval", split=split, every=every))


def _small(c, *, patch_size, hidden, layers, heads, embed):
  tower = dict(hidden=hidden, layers=layers, heads=heads, mlp_dim=4 * hidden)
  c.model.vision.update(patch_size=patch_size, **tower)
  c.model.text.update(max_position=int(c.data.max_text_len), **tower)
  c.model.projection_dim = embed


def _tiny(c):
  c.data.synthetic.generate = True
  c.data.synthetic.update(num_train=32, num_val=8, num_test=16, num_test_unseen=8,
                          num_images=64, num_frames=2, image_size=32, num_shards=2)
  c.data.update(image_size=32, max_text_len=32, shuffle_buffer=64)
  c.data.clip_tokenizer.vocab_size = 1024
  _small(c, patch_size=16, hidden=32, layers=2, heads=2, embed=16)
  c.optim.model.update(lr=3e-3, warmup_frac=0.1, weight_decay=0.0)
  c.batch_size = 8
  c.eval_batch_size = 8
  c.num_steps = 6
  c.log_every = 2
  c.ckpt_every = 6
  c.evals.test.every = 0
  c.progress = False


def _demo(c):
  # Sized for 2 CPU cores (about 8 minutes): 40 px stills, two 4-layer towers of width 128.
  c.data.synthetic.generate = True
  c.data.synthetic.update(image_size=40, num_images=8192, num_train=1024)
  c.data.update(image_size=40, max_text_len=32)
  c.data.clip_tokenizer.vocab_size = 4096
  _small(c, patch_size=8, hidden=128, layers=4, heads=4, embed=128)
  c.optim.model.update(lr=1e-3, warmup_frac=0.05, weight_decay=0.1)
  c.batch_size = 64
  c.eval_batch_size = 64
  # Shape and colour are learned within ~600 steps; where a shape is (the stills' location
  # phrases, what Prompt-CLIP's temporal model needs to tell left from right) only later.
  c.num_steps = 2000
  c.log_every = 50
  c.ckpt_every = 500
  c.evals = ml_collections.ConfigDict({"test": retrieval_eval("test", every=500),
                                       "test_unseen": retrieval_eval("test_unseen")})


def _base(c):
  c.data.synthetic.generate = False


PRESETS = {"tiny": _tiny, "demo": _demo, "base": _base}


def get_config(arg=None):
  return config_lib.build(arg, PRESETS, base)
