"""Prompt-CLIP action recognition (Ju et al., ECCV 2022): prompt vectors around the class names
and a temporal transformer over cached frame features, on a frozen CLIP.

Task `prompt_clip_action` (vlp_jax/methods/prompt_clip/action.py). The stages, in order (the
demo's paths; each command resumes or skips what is done):

  # 1. a CLIP, trained in-repo on the synthetic corpus (it generates runs/clip/data)
  python -m launch.train --config=configs/clip_pretrain.py:demo --workdir=runs/clip
  # 2. as a transformers CLIPModel directory with its tokenizer
  python -m launch.export --workdir=runs/clip --out=runs/clip/hf
  # 3. every stored frame of the splits through its image tower, once
  python -m launch.extract_features --clip=hf:runs/clip/hf --data_dir=runs/clip/data \
      --split=train,test --out=runs/clip/features
  # 4. prompts + temporal model on the cached features
  python -m launch.train --config=configs/prompt_clip_action.py:demo --workdir=runs/pclip \
      --config.init.clip=hf:runs/clip/hf --config.data.features=runs/clip/features \
      --config.data.dir=runs/clip/data

`init.clip` (required) is the frozen CLIP and its tokenizer; `data.features` a cache of
`launch.extract_features` made with that same CLIP (checked by its weights' fingerprint).
`data.dir` holds the records the cache was extracted from: evaluation reads the split's records
once to list its clips (so `data.num_frames` / `data.image_size`, what that pass decodes, are
kept tiny), and `data.classes` "" = DATA_DIR/classes.txt (written from synthetic.json for the
synthetic corpus).

Without a cache (`data.features=""`) the task trains from the frames of `data.dir`: the frozen
CLIP image tower runs in every step (and in evaluation, one window of `data.num_frames` frames
per clip). Then set `data.num_frames` = `model.num_frames` and `data.image_size` = the CLIP's
image size (the task names both when they differ); closed-set protocol only:
  python -m launch.train --config=configs/prompt_clip_action.py:demo --workdir=runs/pclip_frames \
      --config.init.clip=hf:runs/clip/hf --config.data.dir=runs/clip/data \
      --config.data.num_frames=8 --config.data.image_size=40

Protocols (`protocol.name`): `closed` (all classes; `protocol.k_shot` > 0 = a K-shot subset),
`fewshot` (K-shot all-way training, `protocol.k_shot` >= 1), `openset` (train on the seen
classes of `openset_splits(C, protocol.seen_fraction, protocol.num_draws,
protocol.seed)[protocol.draw]`). Name the protocol in the --config string so that the
evaluators follow it: `--config=configs/prompt_clip_action.py:demo,protocol.name=openset`
evaluates `openset` (seen / unseen top-1, harmonic mean) and `action` on `test`; the others
evaluate `action` and `fewshot` (N-way K-shot episodes) on `test`.

Compound class names: the same clips labelled "red moving left" (64 colour + motion classes;
`labels=shape_motion`: "circle moving left", 61) are a corpus of their own, then a cache of it:
  python -m launch.synthetic --config=configs/clip_pretrain.py:demo --out=runs/clip/data_cm \
      --config.data.synthetic.labels=colour_motion
and the demo's time-reversed pairs name motion classes: drop them with
`--config.evals.test.opposites=()` (`evals.test_action.opposites` under `openset`).

Presets: `tiny` (unit tests: tiny sizes, a few steps), `demo` (the synthetic corpus: a demo CLIP
from configs/clip_pretrain.py:demo, context 32, so 8 + 8 prompt vectors; 8-frame clips),
`base` (ViT-B/16 CLIP: D 512, 16 + 16 prompt vectors, 2 temporal layers, 16 frames, batch 64,
AdamW lr 1e-4, weight decay 0.01, constant learning rate).
"""
import ml_collections

from configs import alpro_pretrain
from vlp_jax import config as config_lib


def action_eval(split: str, every: int = 0) -> ml_collections.ConfigDict:
  """A `config.evals` entry of the closed-set evaluator (softmax averaged over `windows`);
  `opposites`: class-name pairs "a|b" scored against each other (`action/opposite_acc`)."""
  return ml_collections.ConfigDict(dict(type="action", split=split, every=every, windows=5,
                                        opposites=()))


# The synthetic corpus's time-reversed class pairs (its label texts): only frame order tells
# them apart.
SYNTHETIC_OPPOSITES = ("moving left|moving right", "moving up|moving down",
                       "growing|shrinking")


def fewshot_eval(split: str, every: int = 0) -> ml_collections.ConfigDict:
  """N-way K-shot episodes (text classifier + support prototypes) on `split`."""
  return ml_collections.ConfigDict(dict(type="fewshot", split=split, every=every, windows=5,
                                        n_way=5, k_shot=5, n_query=15, episodes=200, seed=0))


def openset_eval(split: str, every: int = 0) -> ml_collections.ConfigDict:
  """Seen / unseen top-1 of the protocol's open-set draw on `split`."""
  return ml_collections.ConfigDict(dict(type="openset", split=split, every=every, windows=5))


def _optim(lr: float) -> ml_collections.ConfigDict:
  # AdamW at a constant learning rate (no warm-up, no decay).
  return ml_collections.ConfigDict(dict(
      lr=lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, warmup_frac=0.0, end_lr_frac=1.0,
      clip_norm=0.0, frozen="", lr_mult=(), no_decay=""))


def base() -> ml_collections.ConfigDict:
  c = alpro_pretrain.base()
  c.task = "prompt_clip_action"
  for section in ("loss", "pem", "vtm_negatives"):  # ALPRO's objectives
    del c[section]
  c.data.update(
      features="",              # the feature cache (launch.extract_features --out); "" = frames
      features_allow_missing=False,  # read a split whose extraction left shards missing
      classes="",               # class names, line i = label i; "" = DATA_DIR/classes.txt
      strides=(1.0, 0.5, 1 / 3, 0.25),  # training windows: fraction of frames taken
      # What the evaluation's pass over a split's records decodes (it only lists the clips).
      num_frames=1, image_size=32, eval_sampling="uniform",
      max_text_len=16, mlm_prob=0.0, image_ratio=0.0)
  c.model = ml_collections.ConfigDict(dict(
      num_frames=16,            # T: frames per window (<= temporal.max_frames)
      temperature=0.07,         # logits = cos / temperature (fixed)
      # template: the text around each class name ("a video of a {}."; "{}" = the name);
      # prefix = suffix = 0 with a template is the hand-written zero-shot baseline
      prompts=dict(prefix=16, suffix=16, layout="shared", init_std=0.01, template="{}"),
      # layers = 0: mean pooling over frames (no parameters, no `temporal` collection)
      temporal=dict(layers=2, heads=8, max_frames=16, pos_init_std=0.01),
      dtype="float32",          # compute dtype of the text tower and temporal model
      attention="xla",
      remat="none"))
  c.protocol = ml_collections.ConfigDict(dict(
      name="closed",            # closed | fewshot | openset
      k_shot=0,                 # training clips per class, 0 = all
      seen_fraction=0.75,       # open-set: share of classes seen in training
      draw=0,                   # open-set: which of the num_draws seen/unseen splits
      num_draws=1,
      seed=0))                  # seed of the K-shot subset and the open-set draws
  c.init = ml_collections.ConfigDict(dict(checkpoint="", step=-1,
                                          clip=""))  # "hf:DIR": the frozen CLIP, required
  c.optim.prompts = _optim(1e-4)
  c.optim.temporal = _optim(1e-4)
  del c.optim["model"]
  c.batch_size = 64
  c.eval_batch_size = 64
  c.num_steps = 20_000
  c.log_every = 50
  c.ckpt_every = 1000
  c.evals = ml_collections.ConfigDict({"test": action_eval("test"),
                                       "test_fewshot": fewshot_eval("test")})
  c.sharding_rules = tuple(c.sharding_rules) + (("prompts", None),)
  return c


def _frames(c, n: int) -> None:
  c.model.num_frames = n
  c.model.temporal.max_frames = n


def _tiny(c):
  c.data.synthetic.generate = False
  c.model.prompts.update(prefix=2, suffix=2)
  c.model.temporal.update(layers=1, heads=2)
  _frames(c, 4)
  c.batch_size = 8
  c.eval_batch_size = 8
  c.num_steps = 4
  c.log_every = 2
  c.ckpt_every = 4
  c.optim.prompts.lr = c.optim.temporal.lr = 1e-2
  c.evals.test_fewshot.update(n_way=2, k_shot=1, n_query=1, episodes=4)
  c.progress = False


def _demo(c):
  # The synthetic corpus's 8 motion classes ("moving left", ...), 8 stored frames per clip;
  # a demo CLIP (configs/clip_pretrain.py:demo) has a context of 32 tokens.
  c.data.synthetic.generate = False
  c.model.prompts.update(prefix=8, suffix=8)
  _frames(c, 8)
  # A from-scratch temporal model on features of per-dim scale ~1: at the paper's 0.01 its
  # position embedding leaves the blocks nearly blind to frame order for the whole short run.
  c.model.temporal.pos_init_std = 0.5
  c.optim.prompts.lr = c.optim.temporal.lr = 3e-3
  c.batch_size = 32
  # The temporal model starts to use frame order after a plateau of 400-1,300 steps (seed
  # dependent); 2,000 steps get every seed past it.
  c.num_steps = 2000
  c.log_every = 100
  c.ckpt_every = 1000
  c.evals.test.every = 1000
  c.evals.test.opposites = SYNTHETIC_OPPOSITES
  c.evals.test_fewshot.update(n_query=10, episodes=100)


def _base(c):
  c.data.synthetic.generate = False


PRESETS = {"tiny": _tiny, "demo": _demo, "base": _base}


def get_config(arg=None):
  c = config_lib.build(arg, PRESETS, base)
  if c.protocol.name == "openset":  # the protocol's own evaluation (see the docstring)
    test = c.evals.test
    action = action_eval(test.split, test.every)
    action.opposites = test.opposites
    c.evals = ml_collections.ConfigDict({
        "test": openset_eval(test.split, test.every), "test_action": action})
  return c
