"""ALPRO video-language pre-training: VTC + VTM + MLM + PEM, on mixed video and image batches.

  python -m launch.train --config=configs/alpro_pretrain.py:demo --workdir=runs/demo

Presets: `tiny` (unit tests, seconds), `demo` (README main job, minutes on 2 CPU cores, on the
synthetic "moving shapes" corpus generated into WORKDIR/data), `base` (paper sizes: TimeSformer-B/16
+ bert-base, 4 frames, 224 px, batch 256; set `data.dir` and `data.vocab` to real data).

PEM's teacher is a prompter: the same model trained with VTC only (configs/alpro_prompter.py).
With `pem.prompter` = "" `launch.train` trains it into WORKDIR/prompter first (the stage of
`stages()` below, `pem.prompter_steps`) unless it is already there; or point `pem.prompter` at
a prompter run's WORKDIR. With `order.steps` > 0 a label-free order stage
(vlp_jax/methods/alpro/order.py) comes first, in WORKDIR/order, and starts the prompter.
Entities: `pem.entities` ("" = DATA_DIR/entities.txt, which the synthetic corpus writes; build
one for real data with `python -m launch.entities`).
"""
import copy
import os

import ml_collections

from vlp_jax import config as config_lib


def retrieval_eval(split: str, every: int = 0, rerank_k: int = 0) -> ml_collections.ConfigDict:
  """A `config.evals` entry of ALPRO's retrieval evaluator on `split`."""
  return ml_collections.ConfigDict(dict(type="retrieval", split=split, every=every,
                                        rerank_k=rerank_k))


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = "alpro"

  # Data. `dir` holds `<split>-XXXXX-of-XXXXX.tfrecord`; empty = `WORKDIR/data`, generated
  # from the synthetic corpus when `synthetic.generate` is set and it is not there yet.
  c.data = ml_collections.ConfigDict()
  c.data.source = "tfrecord"           # "tfrecord" | "tfds" | "random" (benchmark, no TF)
  # data.source="tfds": a prepared TFDS video dataset and its feature mapping (`name` with
  # `dir` as its data_dir, or `dir` = a dataset version directory); `caption` "" = the class
  # name of `label`; `id` "" = TFDS's example id. Set data.vocab (or data.dir/vocab.txt).
  c.data.tfds = ml_collections.ConfigDict(dict(name="", dir="", video="video", caption="",
                                               label="label", id=""))
  c.data.dir = ""
  c.data.vocab = ""                     # BERT vocab.txt, or a transformers tokenizer directory
                                        # (e.g. CLIP's); "" = DIR/vocab.txt
  c.data.train_split = "train"
  c.data.num_frames = 4
  c.data.image_size = 224
  c.data.train_sampling = "rand"        # rand | headtail | uniform
  c.data.eval_sampling = "uniform"
  c.data.crop_scale = (0.8, 1.0)        # random-resized-crop area range in training
  c.data.flip = False                   # horizontal flip swaps left/right: off for motion captions
  c.data.max_text_len = 30
  c.data.mlm_prob = 0.15
  c.data.shuffle_buffer = 1024
  c.data.num_parallel_calls = -1        # -1 = tf.data.AUTOTUNE
  c.data.prefetch = 2
  c.data.extra_captions = ""            # launch.augment_captions side files, comma-separated
  # Direction negatives in training batches: a `rate` share of each batch (<= 0.5) replaced by
  # other rows' clips played backwards, their direction words swapped ("a>b,c:d"; "" = the
  # synthetic corpus's left/right, up/down, grows/shrinks vocabulary). 0 = off (ALPRO).
  c.data.reverse_twins = ml_collections.ConfigDict(dict(rate=0.0, swap=""))
  # Mixed video + image-text training (ALPRO: WebVid + CC3M, 50/50): each step is, with
  # probability `image_ratio`, a batch of still images (one-frame clips, repeated to
  # num_frames) from split `image_split` of `image_dir` ("" = the data dir). 0 = video only.
  c.data.image_ratio = 0.5
  c.data.image_dir = ""
  c.data.image_split = "images"
  c.data.synthetic = ml_collections.ConfigDict()
  c.data.synthetic.generate = False
  c.data.synthetic.seed = 0
  c.data.synthetic.num_train = 4096
  c.data.synthetic.num_val = 256
  c.data.synthetic.num_test = 256
  c.data.synthetic.num_test_unseen = 256
  c.data.synthetic.num_images = 2048    # split `images`: still shapes, captions without motion
  c.data.synthetic.num_frames = 8       # stored frames per clip; the pipeline samples num_frames
  c.data.synthetic.image_size = 64
  c.data.synthetic.num_shards = 4
  c.data.synthetic.topic_zipf = 0.0     # > 0: long-tailed (shape, colour) topics in train
  c.data.synthetic.caption_noise = 0.0  # fraction of train clips given another clip's captions
  # class labels: motion (8 classes) | colour_motion (64) | shape_motion (61)
  c.data.synthetic.labels = "motion"

  # Model (ALPRO: TimeSformer-B/16 + bert-base with fusion from layer 6).
  c.model = ml_collections.ConfigDict()
  c.model.video = ml_collections.ConfigDict(dict(
      image_size=224, patch_size=16, num_frames=4, hidden=768, layers=12, heads=12,
      mlp_dim=3072, temporal="divided", dropout=0.0,
      embed_init_std=0.02,                 # std of the CLS token and position embeddings
      time_init_std=0.02,                  # std of the time embeddings
      temporal_dense_init_std=0.0,         # std of temporal_dense's kernel, 0 = zeros
      init_std=0.02))                      # std of every other TimeSformer weight
  c.model.text = ml_collections.ConfigDict(dict(
      vocab_size=0,                     # 0 = size of the tokenizer's vocabulary
      hidden=768, layers=12, fusion_layer=6, heads=12, mlp_dim=3072, max_position=512,
      dropout=0.1,
      init_std=0.02))                     # BERT init std (1 / sqrt(hidden) = width-scaled)
  c.model.embed_dim = 256
  c.model.temp_init = 0.07
  c.model.attention = "xla"             # xla | cudnn
  c.model.dtype = "float32"             # compute dtype; params stay float32
  c.model.remat = "none"                # none | full | dots | dots_no_batch
  # One nn.scan over each encoder's identical layers (params stacked on a leading axis):
  # compile time stops growing with depth. Imports/exports convert to transformers' layout.
  c.model.scan_layers = False

  # Initial weights (applied after the fresh init, before any resume from WORKDIR's own
  # checkpoints). `checkpoint`: another run's WORKDIR, its params copied where names and shapes
  # match (e.g. pre-training -> fine-tuning); `step` -1 = its latest. `text` / `video`:
  # "hf:DIR" = a local transformers checkpoint directory (see vlp_jax/convert/hf.py).
  c.init = ml_collections.ConfigDict(dict(checkpoint="", step=-1, text="", video=""))

  c.loss = ml_collections.ConfigDict(dict(vtc=1.0, vtm=1.0, mlm=1.0, pem=1.0))
  # VTM's negatives: uniformly random until `hard_from`, then sampled by VTC similarity with a
  # sharpness rising linearly to ALPRO's over `ramp` (both fractions of num_steps). 0, 0 = hard
  # from the start (ALPRO).
  # `max_sharpness` < 1 tempers the hard negatives for good (softmax of VTC logits times it).
  # `twin_prob`: with data.reverse_twins, the chance that a row's VTM negative is its
  # time-reversed twin (the other direction of the same clip) instead of a sampled one.
  # `sample_twins`: whether the sampler may draw a row's twin as well. A model that cannot yet
  # tell a clip from its reversal ranks the twin next to the positive, so sampled by VTC
  # similarity the twins become about half of all VTM negatives, a task the head can only
  # meet with its prior; False leaves the twin share to `twin_prob` alone.
  c.vtm_negatives = ml_collections.ConfigDict(dict(hard_from=0.0, ramp=0.0, max_sharpness=1.0,
                                                   twin_prob=0.0, sample_twins=False))

  # Prompting entity modelling (used when loss.pem > 0).
  c.pem = ml_collections.ConfigDict(dict(
      prompter="",             # a prompter run's WORKDIR; "" = WORKDIR/prompter (trained first)
      step=-1,                 # its checkpoint step, -1 = latest
      prompter_steps=100_000,  # training steps of the prompter stage (alpro_prompter.py)
      prompter_ckpt_every=1000,  # its checkpoint interval
      entities="",             # one entity per line; "" = DATA_DIR/entities.txt
      num_entities=1000,       # K: the first K entities of the file
      threshold=0.2,           # drop labels whose top probability is below this
      # How `threshold` is applied: "absolute" (ALPRO, meant for K = 1000): keep a label when
      # its top probability >= threshold; "over_uniform": when top probability - 1/K >=
      # threshold (for small K, where 1/K alone may pass an absolute threshold: K = 8 -> 0.125).
      threshold_mode="absolute",
      # True: pre-training starts from the prompter's weights instead of a fresh init (unless
      # init.checkpoint names a run), so the prompter's VTC-only steps also serve as a first
      # phase of pre-training; the prompter stage then runs even with loss.pem = 0. ALPRO:
      # False (a separate teacher, pre-training from ImageNet / BERT weights).
      warm_start=False,
      area=(0.3, 0.5),         # region area, fraction of the frame
      aspect=(0.3, 1 / 0.3),   # region height / width
  ))

  # Label-free video stage (vlp_jax/methods/alpro/order.py), trained first when `steps` > 0:
  # the video tower learns frame order with a time-reversal InfoNCE (InfoNCE temperature
  # `temp`; positives shifted by <= `max_shift` px) on the training clips, no captions read;
  # its video encoder then starts the prompter (or, without one, pre-training). Clips in which
  # no input value changes by more than `min_change` (normalised units: 1.0 ~ 27 % of the
  # intensity range) over time are not queries: noise has no order. `dir`: an order run's
  # WORKDIR to start from instead; "" = WORKDIR/order, trained by `launch.train` (the stage of
  # `stages()` below). 0 steps = off (ALPRO starts from ImageNet weights).
  c.order = ml_collections.ConfigDict(dict(steps=0, temp=0.1, max_shift=4, min_change=0.8,
                                           dir=""))

  # One optimizer per parameter collection (`optim.<collection>`; ALPRO has `model`), see
  # vlp_jax/core/optim.py: `frozen` = regex of parameter paths that are not trained,
  # `lr_mult` = ((regex, multiplier), ...). `grad_accum`: micro-batches per step.
  c.optim = ml_collections.ConfigDict()
  c.optim.grad_accum = 1
  c.optim.model = ml_collections.ConfigDict(dict(
      lr=1e-4, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.01, warmup_frac=0.05, end_lr_frac=0.0,
      clip_norm=20.0, frozen="", lr_mult=(),
      # As ALPRO's TimeSformer (timm's no_weight_decay): no decay on the CLS token and the
      # position / time embeddings.
      no_decay=r"video_encoder/embeddings/(cls_token|position_embeddings|time_embeddings)"))

  c.batch_size = 256                    # global, over all processes
  c.num_steps = 100_000
  c.log_every = 50
  # Evaluators, each run at the end of training and every `every` steps (0 = only at the end);
  # `type` is one of the task's evaluators. ALPRO's `retrieval` re-ranks each query's top
  # `rerank_k` by VTC logit (sim / temperature) + VTM log-odds (0 = VTC ranks only).
  c.evals = ml_collections.ConfigDict()
  c.evals.test = retrieval_eval("test", every=5000)
  c.eval_batch_size = 256
  # An evaluation that covers fewer clips than its split holds (a corrupt shard) fails, naming
  # both counts, unless missing clips are allowed (then it warns).
  c.eval = ml_collections.ConfigDict(dict(allow_missing=False))
  c.ckpt_every = 1000
  c.keep_ckpts = 3
  c.progress = True
  # Weights & Biases logging besides metrics.jsonl and TensorBoard (needs `pip install wandb`);
  # mode "offline" writes the run under WORKDIR/wandb for a later `wandb sync`.
  c.wandb = ml_collections.ConfigDict(dict(enabled=False, project="vlp_jax", name="",
                                           mode="online"))

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  # Of each axis, the part that spans slices (TPU multi-slice) or hosts (GPU) over the
  # data-centre network; e.g. 4 hosts x 8 GPUs: mesh.data=4, mesh.fsdp=8, mesh.dcn.data=4.
  c.mesh.dcn = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))
  # "A:B": a jax.profiler trace of steps A..B (1-based) in WORKDIR/profile (TensorBoard or
  # Perfetto); "" = off.
  c.profile_steps = ""
  # Logical axis -> mesh axes. A mesh axis already used by an earlier dimension of the same
  # array is skipped, so activations [batch, length, embed] keep embed unsharded.
  c.sharding_rules = (
      ("batch", ("data", "fsdp")),
      ("embed", "fsdp"),
      ("heads", "tensor"),
      ("mlp", "tensor"),
      ("vocab", "tensor"),
      ("kv", None),
      ("length", None),
      ("frames", None),
      ("entities", "tensor"),
      ("classes", "tensor"),
  )
  return c


def _tiny(c):
  c.data.synthetic.generate = True
  c.data.synthetic.update(num_train=64, num_val=16, num_test=16, num_test_unseen=16,
                          num_frames=4, image_size=32, num_shards=2, num_images=32)
  c.data.update(num_frames=2, image_size=32, shuffle_buffer=64, max_text_len=16)
  c.model.video.update(image_size=32, patch_size=16, num_frames=2, hidden=32, layers=2, heads=2,
                       mlp_dim=64)
  c.model.text.update(hidden=32, layers=2, fusion_layer=1, heads=2, mlp_dim=64, max_position=64)
  c.model.embed_dim = 16
  c.optim.model.update(lr=3e-3, warmup_frac=0.1)
  c.batch_size = 8
  c.eval_batch_size = 8
  c.num_steps = 30
  c.log_every = 5
  c.evals.test.every = 0
  c.ckpt_every = 10
  c.progress = False
  # The 8 shape nouns of entities.txt; the prompter saves once (at its last step).
  c.pem.update(num_entities=8, prompter_steps=10, prompter_ckpt_every=10)


def _demo(c):
  # Sized for 2 CPU cores: about 14 minutes end to end (order stage, prompter, pre-training
  # with PEM; README figures).
  c.data.synthetic.generate = True
  c.data.synthetic.image_size = 40
  # headtail (frames 0, 2, 5, 7 of 8) is symmetric in time: a reversed clip yields the same
  # frame set, so only temporal modelling, not a sampling bias, can tell directions apart.
  # max_text_len 24 holds the corpus's longest caption (two objects, two motions).
  c.data.update(num_frames=4, image_size=40, shuffle_buffer=1024, max_text_len=24,
                eval_sampling="headtail")
  # Every step a video batch (still images teach no motion), half of it time-reversed twins
  # with the opposite direction words: in-batch negatives that differ only in time order.
  c.data.image_ratio = 0.0
  c.data.reverse_twins.rate = 0.5
  # From-scratch init at width 128: width-scaled kernels (1 / sqrt(128)) in both towers; at
  # timm's / HF's 0.02 both collapse to input-independent features for the first ~250 steps
  # (VTC at ln B); large time embeddings let temporal attention tell frames apart.
  c.model.video.update(image_size=40, patch_size=8, num_frames=4, hidden=128, layers=4, heads=4,
                       mlp_dim=256, init_std=0.088, time_init_std=1.0, embed_init_std=0.3,
                       temporal_dense_init_std=0.088)
  c.model.text.update(hidden=128, layers=4, fusion_layer=2, heads=4, mlp_dim=256,
                      max_position=64, init_std=0.088)
  c.model.embed_dim = 128
  # VTM: random negatives for the first 40 % (what the encoders already tell apart), then
  # VTC-sampled ones, tempered (sharpness 0.5).
  c.vtm_negatives.update(hard_from=0.4, ramp=0.4, max_sharpness=0.5)
  c.optim.model.update(lr=1e-3, warmup_frac=0.05)
  c.batch_size = 32
  c.eval_batch_size = 64
  c.num_steps = 400
  c.log_every = 50
  c.evals.test = retrieval_eval("test", every=200, rerank_k=16)
  c.evals.test_unseen = retrieval_eval("test_unseen", every=200)
  c.ckpt_every = 200
  # K = 8 shape nouns: uniform is already 0.125, so the threshold is a margin over it.
  # From scratch, VTC alone finds motion direction only after 1200+ steps, and not in every
  # seed: a label-free order stage (300 steps) first gives the video tower frame order, then
  # the prompter (VTC only, about half the cost of a full step) trains from it, and
  # pre-training starts from the prompter (README "The order stage inside launch.train").
  c.order.steps = 300
  c.pem.update(num_entities=8, prompter_steps=1000, prompter_ckpt_every=1000,
               threshold_mode="over_uniform", warm_start=True)


def _base(c):
  c.data.synthetic.generate = False


def _bench(c):
  # The CPU speed comparison of `launch.benchmark --compare=torch` (README "Performance"):
  # TimeSformer 6 x 384 at 4 x 112^2, BERT 6 x 384 (+ one fusion layer VTC does not use),
  # text length 32, batch 16.
  c.data.update(num_frames=4, image_size=112, max_text_len=32)
  c.model.video.update(image_size=112, patch_size=16, num_frames=4, hidden=384, layers=6,
                       heads=6, mlp_dim=1536)
  c.model.text.update(hidden=384, layers=7, fusion_layer=6, heads=6, mlp_dim=1536)
  c.batch_size = 16


PRESETS = {"tiny": _tiny, "demo": _demo, "base": _base, "bench": _bench}


def get_config(arg=None):
  return config_lib.build(arg, PRESETS, base)


def prompter_stage(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The prompter stage of a pre-training config: same model, data and optimiser, VTC only.

  Returns a copy with `loss` = VTC only, `num_steps` = `pem.prompter_steps`, `ckpt_every` =
  `pem.prompter_ckpt_every`, evaluation only at the end, and no `init.checkpoint` or
  `pem.warm_start` (transformers imports `init.text` / `init.video` stay).
  """
  c = copy.deepcopy(config)
  with c.unlocked():
    for k in c.loss:
      c.loss[k] = 1.0 if k == "vtc" else 0.0
    c.num_steps = int(config.pem.prompter_steps)
    c.ckpt_every = int(config.pem.prompter_ckpt_every)
    for ev in c.evals.values():
      ev.every = 0
      if "rerank_k" in ev:
        ev.rerank_k = 0  # the prompter trains no VTM head
    c.init.checkpoint = ""
    c.pem.warm_start = False  # the prompter itself starts fresh
  return c


def order_stage(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The order stage of a pre-training config: same model and data, task `alpro_order`.

  Returns a copy with `num_steps` = `order.steps` (one checkpoint, at the end), video batches
  only (no still images, no reversed twins: the loss makes its own reversals), one `order`
  evaluation at the end on the first eval's split, and no `init.checkpoint`.
  """
  c = copy.deepcopy(config)
  splits = [ev.split for ev in config.evals.values()]
  with c.unlocked():
    c.task = "alpro_order"
    c.num_steps = c.ckpt_every = int(config.order.steps)
    c.data.image_ratio = 0.0
    c.data.reverse_twins.rate = 0.0
    c.evals = ml_collections.ConfigDict(
        {"order": dict(type="order", split=splits[0], every=0)} if splits else {})
    c.init.checkpoint = ""
  return c


def stages(config: ml_collections.ConfigDict, workdir: str) -> list[tuple[str, object, str]]:
  """Runs `python -m launch.train` completes before training `config` in `workdir`:
  [(name, config, workdir)], in order. `order.steps` > 0 with `order.dir` = "" trains the
  order stage in WORKDIR/order (`order_stage`); PEM or `pem.warm_start` with `pem.prompter`
  = "" needs its prompter in WORKDIR/prompter (`prompter_stage`), which starts from the order
  stage. Random benchmark data has no stages (PEM then uses an untrained prompter). The
  stages read the run's data directory (WORKDIR/data when `data.dir` is ""): one corpus."""
  if config.data.source == "random":
    return []
  root = os.path.abspath(workdir)
  out = []

  def add(name, stage_config):
    if not stage_config.data.dir and stage_config.data.source != "tfds":
      with stage_config.unlocked():
        stage_config.data.dir = os.path.join(root, "data")
    out.append((name, stage_config, os.path.join(root, name)))

  steps = int(config.get("order", {}).get("steps", 0))
  warm = bool(config.pem.get("warm_start", False))
  prompter_wanted = (float(config.loss.pem) > 0 or warm) and not config.pem.prompter
  # The order stage starts the prompter stage, or this run when it does not start from one.
  if steps > 0 and not config.order.dir and (prompter_wanted or not warm):
    add("order", order_stage(config))
  if prompter_wanted:
    prompter = prompter_stage(config)
    if steps > 0:
      with prompter.unlocked():
        prompter.order.dir = config.order.dir or os.path.join(root, "order")
    add("prompter", prompter)
  return out
