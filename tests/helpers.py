"""Helpers shared by several test modules (tests/ is on sys.path under pytest)."""
import ml_collections

from configs import alpro_pretrain


def override(c, **overrides):
  """Sets dotted-key overrides on config `c` (`num_steps=40`, `**{"pem.threshold": 0.0}`; a
  dict value becomes a ConfigDict); returns `c`."""
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split(".")
    for name in parents:
      node = node[name]
    node[leaf] = ml_collections.ConfigDict(v) if isinstance(v, dict) else v
  return c


def tiny_config(data_dir, **overrides):
  """`alpro_pretrain.py:tiny` reading `data_dir`, with dotted-key overrides (`num_steps=40`,
  `**{"pem.threshold": 0.0}`); `evals={}` turns evaluation off."""
  c = alpro_pretrain.get_config("tiny")
  c.data.dir = str(data_dir)
  return override(c, **overrides)


def save_tiny_clip(clip_dir: str, texts, dim: int, *, vocab_size: int = 600,
                   vocab_multiple: int = 1, image_size: int = 32):
  """A CLIP tokenizer learned on `texts` and a tiny random CLIP (width 32, 1 layer per tower,
  context 16, projection `dim`, patch 16) written next to it as a transformers CLIPModel
  directory. The weights are perturbed beyond the init's scale so that different texts get
  clearly different features. Returns (the tokenizer, the numpy generator that drew the
  perturbation, to draw the test's data from)."""
  import flax.linen as nn
  import jax
  import numpy as np

  from vlp_jax.convert import clip as convert_clip
  from vlp_jax.data import clip_tokenizer
  from vlp_jax.models import clip
  tok = clip_tokenizer.build_clip_tokenizer(list(texts), clip_dir, vocab_size=vocab_size)
  n = len(tok)
  cfg = clip.ClipConfig(
      text=clip.ClipTextConfig(vocab_size=n + (-n % vocab_multiple), hidden=32, layers=1,
                               heads=2, mlp_dim=64, max_position=16, eos_token_id=n - 1,
                               bos_token_id=n - 2, pad_token_id=n - 1),
      vision=clip.ClipVisionConfig(image_size=image_size, patch_size=16, hidden=32, layers=1,
                                   heads=2, mlp_dim=64),
      projection_dim=dim)
  params = nn.unbox(clip.CLIP(cfg).init(
      jax.random.PRNGKey(0), np.zeros((1, image_size, image_size, 3)),
      np.zeros((1, 16), np.int32))["params"])
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: np.asarray(x) + 0.2 * rng.standard_normal(x.shape), params)
  convert_clip.export_clip(cfg, params, clip_dir)
  return tok, rng


def train(config, workdir, **kwargs):
  """`launch.train`'s path for a pre-training config: its stages (PEM's prompter), then the run."""
  from launch import stages
  return stages.train(config, str(workdir), alpro_pretrain.stages, **kwargs).results


def perturb(model):
  """A torch model with random non-trivial values everywhere (biases and LayerNorms are 0 / 1
  at init, which would hide mapping mistakes), in eval mode."""
  import torch
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=gen))
  return model.eval()


def records_pass(ids, batch=4):
  """What the core's eval loader yields for a task's evaluators when only the clip list
  matters: `video_id` (bytes) and `valid`, the last batch padded."""
  import numpy as np
  ids = [v.encode() for v in ids]
  ids += [b""] * (-len(ids) % batch)
  return [{"video_id": np.asarray(ids[i:i + batch], object),
           "valid": np.asarray([bool(v) for v in ids[i:i + batch]])}
          for i in range(0, len(ids), batch)]


def init_params(task, seed: int = 1):
  """A task's freshly initialised trainable collections as unboxed numpy arrays."""
  import flax.linen as nn
  import jax
  import numpy as np
  return jax.tree.map(np.asarray, nn.unbox(task.init_collections(jax.random.PRNGKey(seed))))
