"""The training loop: sharded state, jitted step, checkpoints with resume, metrics, eval hooks.

It knows nothing about a particular model: the task (`config.task`) supplies the params, the
loss and the evaluation.
"""
from __future__ import annotations

import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from vlp_jax.data import setup as data_setup
from vlp_jax.parallel import mesh as mesh_lib
from vlp_jax.parallel import sharding as shd
from vlp_jax.train import checkpoint as ckpt_lib
from vlp_jax.train import init as init_lib
from vlp_jax.train import metrics as metrics_lib
from vlp_jax.train import optim
from vlp_jax.train import step as step_lib
from vlp_jax.train.tasks import get_task

# Arrays of a host batch that go to the devices unless the task names its own
# (`task.device_keys`); ids and strings stay on the host.
DEVICE_KEYS = ("video", "text_ids", "text_mask", "mlm_ids", "mlm_labels", "valid")


class NonFiniteLossError(FloatingPointError):
  """Raised when the training loss or gradient norm becomes NaN or Inf."""


class Run:
  """Everything a run builds from its config once: mesh, data, task, optimizer, state."""

  def __init__(self, config, workdir: str, devices=None):
    self.config = config
    self.workdir = os.path.abspath(workdir)
    os.makedirs(self.workdir, exist_ok=True)
    self.mesh = mesh_lib.make_mesh(config.mesh, devices)
    self.rules = shd.rules_from_config(config.sharding_rules)
    self.data_dir = None
    if config.data.source != "random":
      self.data_dir = data_setup.resolve_dir(config, self.workdir)
      with config.unlocked():
        config.data.dir = self.data_dir
    self.text = data_setup.text_info(config, self.data_dir, self.workdir)
    self.task = get_task(config, self.text.vocab_size)
    self.tx, self.schedule = optim.make_optimizer(config.optim, config.num_steps)
    self.batch_per_process = shd.batch_size_per_process(config.batch_size, self.mesh, self.rules)
    accum = int(config.optim.grad_accum)
    if accum < 1 or config.batch_size % accum:
      raise ValueError(f"optim.grad_accum={accum} must be >= 1 and divide batch_size="
                       f"{config.batch_size}")
    self.state, self.shardings = step_lib.create_sharded_state(
        self.task.init_params, self.tx, jax.random.PRNGKey(config.seed), self.mesh, self.rules)
    self.checkpointer = ckpt_lib.Checkpointer(self.workdir, keep=config.keep_ckpts)
    self.device_keys = tuple(getattr(self.task, "device_keys", DEVICE_KEYS))
    # Parameters the loss reads but never trains (PEM's prompter): a separate sharded pytree.
    frozen = None
    if hasattr(self.task, "frozen_params"):
      frozen = self.task.frozen_params(self.mesh, self.rules, workdir=self.workdir)
    self.frozen, self.frozen_shardings = frozen if frozen is not None else (None, None)

  def apply_init(self) -> None:
    """Applies `config.init` (another run's params, transformers checkpoints) to the state.

    Call it only for a run that does not resume from its own checkpoint.
    """
    init = self.config.get("init")
    if init is None or not any(init.get(k, "") for k in ("checkpoint", "text", "video")):
      logging.info("no config.init.checkpoint / init.text / init.video: starting from a fresh "
                   "init")
      return
    model_config = getattr(getattr(self.task, "model", None), "config", None)
    params = init_lib.apply_init(init, self.state.params, self.shardings.params, model_config)
    self.state = self.state.replace(params=params)

  def train_step(self):
    """The jitted `(state, batch) -> (state, metrics)` of this run (frozen params bound)."""
    step_fn = step_lib.make_train_step(self.task.loss, self.tx, self.schedule,
                                       int(self.config.optim.grad_accum))
    return step_lib.jit_train_step(step_fn, self.shardings, self.mesh, self.rules,
                                   self.frozen, self.frozen_shardings)

  def abstract_state(self) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        self.state, self.shardings)

  def restore(self, loader=None, step: int | None = None) -> int | None:
    """Loads checkpoint `step` (default: latest) into `self.state`; returns the step or None."""
    step = self.checkpointer.latest_step() if step is None else step
    if step is None:
      return None
    self.state = self.checkpointer.restore(step, self.abstract_state(), loader)
    return step

  def evaluate(self, step: int, writer: metrics_lib.MetricWriter) -> dict[str, dict]:
    """Runs the task's evaluation on every `data.eval_splits` split and logs it."""
    results = {}
    if self.data_dir is None:
      return results
    n = int(self.config.eval_batch_size)
    per_process = shd.batch_size_per_process(n, self.mesh, self.rules)
    for split in data_setup.eval_splits(self.config):
      t0 = time.time()
      loader = data_setup.eval_loader(self.config, self.data_dir, split, self.text, per_process)
      kwargs = {} if self.frozen is None else {"frozen": self.frozen}
      m = self.task.evaluate(self.state.params, loader, self.mesh, self.rules, **kwargs)
      m["eval_seconds"] = time.time() - t0
      results[split] = writer.write(step, split, m)
      logging.info("step %d %s: %s", step, split,
                   " ".join(f"{k}={v:.2f}" for k, v in m.items()))
    return results


def _check_finite(metrics: dict, step: int) -> None:
  if not bool(jax.device_get(metrics["finite"])):
    loss = float(jax.device_get(metrics["loss"]))
    gnorm = float(jax.device_get(metrics["grad_norm"]))
    raise NonFiniteLossError(
        f"non-finite training loss at step {step} (loss={loss}, grad_norm={gnorm}); stopping. "
        "The last checkpoint written before this step is kept.")


def _total_skipped(loader) -> int:
  local = np.asarray(getattr(loader, "skipped", 0), np.int64)
  if jax.process_count() == 1:
    return int(local)
  return int(np.sum(multihost_utils.process_allgather(local)))


def train(config, workdir: str, *, stop_at: int | None = None, devices=None) -> dict:
  """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one.

  Args:
    stop_at: stop after this step (as if preempted) without the final evaluation.
    devices: the mesh's devices (default: all).
  Returns:
    {"train": last logged train metrics, "<split>": last eval metrics, ...}.
  Raises:
    NonFiniteLossError: the loss became NaN/Inf (its step is in the message).
  """
  run = Run(config, workdir, devices)
  if jax.process_index() == 0:
    with open(os.path.join(run.workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  loader = data_setup.train_loader(config, run.data_dir, run.text, run.batch_per_process)
  start = run.restore(loader)
  step = 0 if start is None else start
  if start is not None:
    logging.info("resumed from %s at step %d", run.checkpointer.manager.directory, start)
  else:
    run.apply_init()
  step_fn = run.train_step()
  writer = metrics_lib.MetricWriter(run.workdir)
  progress = metrics_lib.Progress(step, config.num_steps, enabled=config.progress)
  results: dict[str, dict] = {}
  history, previous = [], None
  t_log, steps_since_log = time.time(), 0
  batches = iter(loader)
  try:
    while step < config.num_steps:
      host = next(batches)
      batch = shd.host_to_global(host, run.mesh, run.rules, keys=run.device_keys)
      run.state, metrics = step_fn(run.state, batch)
      step += 1
      steps_since_log += 1
      if previous is not None:  # one step behind, so the host never waits on the device
        _check_finite(previous, step - 1)
      previous = metrics
      history.append(metrics)
      last = step == config.num_steps
      if step % config.log_every == 0 or last:
        _check_finite(metrics, step)
        m = metrics_lib.mean_metrics(history)
        m.pop("finite", None)
        history = []
        m["steps_per_sec"] = steps_since_log / max(time.time() - t_log, 1e-9)
        m["data/skipped_clips"] = _total_skipped(loader)
        t_log, steps_since_log = time.time(), 0
        results["train"] = writer.write(step, "train", m)
        progress.update(step, m["loss"])
      else:
        progress.update(step)
      if step % config.ckpt_every == 0 or last or step == stop_at:
        _check_finite(metrics, step)
        run.checkpointer.save(step, run.state, loader)
      if config.eval_every and step % config.eval_every == 0 and not last:
        results.update(run.evaluate(step, writer))
      if stop_at is not None and step >= stop_at:
        break
    if step >= config.num_steps:
      results.update(run.evaluate(step, writer))
  finally:
    progress.close()
    run.checkpointer.close()
    writer.close()
  return results
