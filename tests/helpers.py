"""Helpers shared by several test modules (tests/ is on sys.path under pytest)."""
import ml_collections

from configs import alpro_pretrain


def tiny_config(data_dir, **overrides):
  """`alpro_pretrain.py:tiny` reading `data_dir`, with dotted-key overrides (`num_steps=40`,
  `**{"pem.threshold": 0.0}`); `evals={}` turns evaluation off."""
  c = alpro_pretrain.get_config("tiny")
  c.data.dir = str(data_dir)
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split(".")
    for name in parents:
      node = node[name]
    node[leaf] = ml_collections.ConfigDict(v) if isinstance(v, dict) else v
  return c


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
