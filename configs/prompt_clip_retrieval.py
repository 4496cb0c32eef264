"""Prompt-CLIP text-video retrieval (Ju et al., ECCV 2022): prompt vectors around each caption
and a temporal transformer over cached frame features, on a frozen CLIP, trained with a
symmetric InfoNCE.

Task `prompt_clip_retrieval` (vlp_jax/methods/prompt_clip/retrieval.py). The stages, in order
(the demo's paths; stages 1-3 are those of configs/prompt_clip_action.py, shared with it):

  # 1. a CLIP, trained in-repo on the synthetic corpus (it generates runs/clip/data)
  python -m launch.train --config=configs/clip_pretrain.py:demo --workdir=runs/clip
  # 2. as a transformers CLIPModel directory with its tokenizer
  python -m launch.export --workdir=runs/clip --out=runs/clip/hf
  # 3. every stored frame of the splits through its image tower, once
  python -m launch.extract_features --clip=hf:runs/clip/hf --data_dir=runs/clip/data \
      --split=train,test --out=runs/clip/features
  # 4. prompts + temporal model on the cached features and the records' captions
  python -m launch.train --config=configs/prompt_clip_retrieval.py:demo \
      --workdir=runs/pclip_ret --config.init.clip=hf:runs/clip/hf \
      --config.data.features=runs/clip/features --config.data.dir=runs/clip/data

`init.clip` (required) is the frozen CLIP and its tokenizer; `data.features` (required) a cache
of `launch.extract_features` made with that same CLIP (checked by its weights' fingerprint);
`data.dir` (required) holds the records the cache was extracted from: the captions of each split
(`caption/string`) are read from them once, and evaluation's pass over a split's records lists
its clips (so `data.num_frames` / `data.image_size`, what that pass decodes, are kept tiny).
Clips need no class label. Every caption must fit the text context with the prompts:
P + Q + its tokens + 2 <= the context (an error names the first that does not).

Evaluation (`evals.test`, type `retrieval`): every caption of the split's clips against the
clips (a clip = the normalised mean of `windows` evenly spaced windows) -> `retrieval/t2v_R@1`,
`t2v_R@5`, `t2v_R@10`, `t2v_MdR`, `t2v_MnR` and the same with `v2t_` (`eval/retrieval.py`).

Presets: `tiny` (unit tests), `demo` (the synthetic corpus: a demo CLIP of context 32 and
captions of up to 22 tokens, so 4 + 4 prompt vectors (32 - 2 - 8 = 22); 8-frame clips, batch
32, 400 steps at lr 1e-3, evaluated at 200 and 400), `base` (ViT-B/16 CLIP,
context 77: 8 + 8 prompt vectors, 2 temporal layers, 16 frames, batch 64, AdamW lr 1e-4).
"""
import ml_collections

from configs import prompt_clip_action
from vlp_jax import config as config_lib

TASK = "prompt_clip_retrieval"


def retrieval_eval(split: str, every: int = 0) -> ml_collections.ConfigDict:
  """A `config.evals` entry of the retrieval evaluator on `split` (`windows` per clip)."""
  return ml_collections.ConfigDict(dict(type="retrieval", split=split, every=every, windows=5))


def base() -> ml_collections.ConfigDict:
  c = prompt_clip_action.base()
  c.task = TASK
  c.model.prompts.update(prefix=8, suffix=8)
  c.evals = ml_collections.ConfigDict({"test": retrieval_eval("test")})
  return c


def _preset(name: str, prefix: int, suffix: int):
  """prompt_clip_action's preset `name` (model, optimiser and run sizes), then this task's
  prompt lengths and evaluation in place of the action evaluators that preset tunes."""
  def apply(c):
    c.evals = ml_collections.ConfigDict({"test": prompt_clip_action.action_eval("test"),
                                         "test_fewshot": prompt_clip_action.fewshot_eval("test")})
    prompt_clip_action.PRESETS[name](c)
    every = c.evals.test.every
    c.model.prompts.update(prefix=prefix, suffix=suffix)
    c.evals = ml_collections.ConfigDict({"test": retrieval_eval("test", every)})
  return apply


PRESETS = {"tiny": _preset("tiny", 2, 2),
           "demo": _preset("demo", 4, 4),
           "base": _preset("base", 8, 8)}


def get_config(arg=None):
  return config_lib.build(arg, PRESETS, base)
