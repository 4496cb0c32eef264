"""Multi-stage recipes: the runs a config needs finished before its own training.

A config file may define `stages(config, workdir) -> [(name, stage_config, stage_workdir)]`
(configs/alpro_pretrain.py: PEM's prompter). `launch.train` trains each stage that is not yet
at its last step, in order, then the config itself; a task never starts a run.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType
from collections.abc import Callable

from absl import logging

import configs
from vlp_jax.core import checkpoint as ckpt_lib
from vlp_jax.core import trainer

StagesFn = Callable[[object, str], list]


def config_module(path: str) -> ModuleType:
  """Imports a config file (`configs/x.py`, or the `--config` value `configs/x.py:preset`) as a
  module, to read its `stages`: the installed `configs.x` for the project's own configs, a
  private module for any other file."""
  path = os.path.abspath(path.split(":", 1)[0])
  stem = os.path.splitext(os.path.basename(path))[0]
  if os.path.dirname(path) == os.path.dirname(os.path.abspath(configs.__file__)):
    return importlib.import_module(f"configs.{stem}")
  spec = importlib.util.spec_from_file_location(f"_vlp_jax_config_{stem}", path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"config file {path!r} cannot be imported")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def train(config, workdir: str, stages: StagesFn | None = None, *, devices=None,
          stop_at: int | None = None) -> trainer.Trainer:
  """Trains every stage of `stages(config, workdir)` that has not reached its last step, in
  order, then `config` in `workdir` (resuming each from its checkpoints).

  Returns:
    The trainer of the last run fitted: `results` holds its last metrics, `preempted_at` the
    step a SIGTERM stopped it at (None when it finished; a preempted stage stops the recipe).
  """
  for name, stage_config, stage_dir in (stages(config, workdir) if stages else []):
    done = ckpt_lib.latest_step(stage_dir) or 0
    if done >= int(stage_config.num_steps):
      logging.info("stage %s: complete in %s (step %d)", name, stage_dir, done)
      continue
    logging.info("stage %s: training %d steps in %s", name, stage_config.num_steps, stage_dir)
    run = trainer.Trainer(stage_config, stage_dir, devices).build()
    run.fit()
    if run.preempted_at is not None:
      return run
    logging.info("stage %s: done: %s", name, {
        k: {m: round(v, 2) for m, v in r.items()
            if "R@" in m or m == "loss" or m.startswith("order/")}
        for k, r in run.results.items()})
  run = trainer.Trainer(config, workdir, devices).build()
  run.fit(stop_at=stop_at)
  return run
