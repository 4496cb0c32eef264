"""Prompt-CLIP temporal action localisation: class-agnostic proposals classified by a
`prompt_clip_action` model (learned prompts + temporal model on a frozen CLIP).

Task `prompt_clip_localization` (vlp_jax/methods/prompt_clip/localization.py): the action task
with the same parameters plus the `localization` evaluator, so the usual run is the evaluation
of a trained action run on untrimmed videos (the demo's paths):

  # 1.-4. configs/prompt_clip_action.py: a CLIP (runs/clip/hf), its features, and
  #       prompts + temporal model trained on the trimmed clips (runs/pclip)
  # 5. untrimmed videos with ground-truth segments and noisy-oracle proposals
  python -m launch.synthetic_untrimmed --out=runs/untrimmed
  # 6. their frame features, with the same CLIP
  python -m launch.extract_features --clip=hf:runs/clip/hf --data_dir=runs/untrimmed \
      --split=test --out=runs/untrimmed/features
  # 7. localisation mAP of the action run's weights (a new WORKDIR, logged as step 0)
  python -m launch.evaluate --config=configs/prompt_clip_localization.py:demo \
      --workdir=runs/ploc --config.init.checkpoint=runs/pclip \
      --config.init.clip=hf:runs/clip/hf --config.data.features=runs/untrimmed/features \
      --config.data.dir=runs/untrimmed

`init.clip` and `data.features` are required as for prompt_clip_action; `data.dir` holds the
split's records (their `segment/start`, `segment/end`, `segment/label/index` are the ground
truth) and `data.classes` "" = DATA_DIR/classes.txt (the same class list, in the same order, as
the action run's). Training with this config trains exactly as prompt_clip_action does (on the
labelled clips of the cache's training split).

The evaluator's keys (`evals.<name>`):
  proposals  an ActivityNet-style JSON of class-agnostic proposals;
             "" = DATA_DIR/proposals_<split>.json
  top_k      classes kept per proposal (2): detection score = proposal score x probability
  nms_iou    temporal NMS per video and class: drop a detection whose tIoU with a kept,
             higher-scored one exceeds it (0.5; 1.0 = no NMS)
  tious      mAP thresholds: "thumos14" (0.3:0.1:0.7), "activitynet" (0.5:0.05:0.95) or
             "0.3,0.5" (as a --config.evals.<name>.tious flag: commas separate inline
             overrides)
  frames     frames per proposal window (0 = model.temporal.max_frames); longer proposals are
             evenly resampled to it

Presets: `tiny` (unit tests), `demo` (the synthetic untrimmed videos and the demo action run:
8-frame windows, 8 + 8 prompt vectors), `base` (THUMOS14-style: ViT-B/16 CLIP, 16-frame windows,
tIoU 0.3:0.1:0.7; `--config.evals.test.tious=activitynet` for ActivityNet's 0.5:0.05:0.95).
"""
import ml_collections

from configs import prompt_clip_action
from vlp_jax import config as config_lib

TASK = "prompt_clip_localization"


def localization_eval(split: str, every: int = 0, tious: str = "thumos14"
                      ) -> ml_collections.ConfigDict:
  """A `config.evals` entry of the localization evaluator on `split` (keys: module doc)."""
  return ml_collections.ConfigDict(dict(type="localization", split=split, every=every,
                                        proposals="", top_k=2, nms_iou=0.5, tious=tious,
                                        frames=0))


def base() -> ml_collections.ConfigDict:
  c = prompt_clip_action.base()
  c.task = TASK
  c.evals = ml_collections.ConfigDict({"test": localization_eval("test")})
  return c


def _preset(name: str):
  """prompt_clip_action's preset `name` (model, optimiser and run sizes), then this task's
  evaluation in place of the action evaluators that preset tunes."""
  def apply(c):
    c.evals = ml_collections.ConfigDict({"test": prompt_clip_action.action_eval("test"),
                                         "test_fewshot": prompt_clip_action.fewshot_eval("test")})
    prompt_clip_action.PRESETS[name](c)
    c.evals = ml_collections.ConfigDict({"test": localization_eval("test")})
  return apply


PRESETS = {name: _preset(name) for name in ("tiny", "demo", "base")}


def get_config(arg=None):
  return config_lib.build(arg, PRESETS, base)
