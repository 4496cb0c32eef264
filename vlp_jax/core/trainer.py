"""The trainer: build a run from its config, then fit it (or evaluate it).

    trainer = Trainer(config, workdir).build()   # mesh, data, task, optimizers, sharded state
    results = trainer.fit()                      # resumes from WORKDIR's latest checkpoint

It knows no method: the task (`config.task`, `vlp_jax/core/task.py`) supplies the parameter
collections, data streams, loss or update function, frozen pytrees and evaluators. The
constructor has no side effects and the caller's config is never mutated; the resolved config
(the data directory filled in) is written to WORKDIR/config.json when fitting starts.
"""
from __future__ import annotations

import copy
import json
import os
import signal
import threading
import time
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from vlp_jax.core import checkpoint as ckpt_lib
from vlp_jax.core import init as init_lib
from vlp_jax.core import metrics as metrics_lib
from vlp_jax.core import optim
from vlp_jax.core import profile as profile_lib
from vlp_jax.core import state as state_lib
from vlp_jax.core import task as task_lib
from vlp_jax.core import update as update_lib
from vlp_jax.data import setup as data_setup
from vlp_jax.parallel import mesh as mesh_lib
from vlp_jax.parallel import sharding as shd


class NonFiniteLossError(FloatingPointError):
  """Raised when the training loss, a gradient or an updated parameter becomes NaN or Inf."""


class EvalCountError(RuntimeError):
  """An evaluation saw another number of clips than its split holds as written."""


class _Counted:
  """Passes an eval loader's batches through, counting valid rows and distinct clip ids."""

  def __init__(self, loader):
    self.loader = loader
    self.rows = 0
    self.clips: set = set()

  def __iter__(self):
    for batch in self.loader:
      valid = np.asarray(batch["valid"], bool)
      self.rows += int(valid.sum())
      if "video_id" in batch:
        self.clips.update(np.asarray(batch["video_id"])[valid].tolist())
      yield batch

  def totals(self) -> tuple[int, int]:
    """(clips, rows) over all processes (each reads its own files, so clips do not repeat)."""
    local = np.asarray([len(self.clips) or self.rows, self.rows], np.int64)
    if jax.process_count() > 1:
      local = np.sum(multihost_utils.process_allgather(local), axis=0)
    return int(local[0]), int(local[1])


class Preemption:
  """SIGTERM (the preemption notice of cloud TPU / GPU VMs) -> stop at the next step boundary.

  One process: a SIGTERM handler sets a flag. Several processes: JAX's preemption sync point
  (the coordination service relays one host's SIGTERM to all), so every host stops, and saves,
  at the same step.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    self._multi = jax.process_count() > 1
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self.requested = True

  def reached(self, step: int) -> bool:
    """Whether to stop after `step` (every process calls this at every step)."""
    if self._multi:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def select_keys(batch: Mapping[str, Any], keys, stream: str) -> dict[str, Any]:
  """The entries `keys` of a host batch of `stream`.

  Raises:
    KeyError: a key the stream declares is missing from the batch (named with the stream).
  """
  missing = [k for k in keys if k not in batch]
  if missing:
    raise KeyError(f"stream {stream!r}: the host batch has no {missing} (it has "
                   f"{sorted(batch)})")
  return {k: batch[k] for k in keys}


class Trainer:
  """Everything a run builds from its config once: mesh, data, task, optimizers, state.

  Attributes (after `build`):
    config: the resolved copy of the config. mesh, rules: the device mesh and logical rules.
    task: the `Task`. streams: {name: `Stream`}. optimizers: {collection: (tx, schedule)}.
    state, shardings: the sharded `TrainState` and its shardings.
    checkpointer: the run's `Checkpointer`.
  """

  def __init__(self, config, workdir: str, devices=None):
    self.config = copy.deepcopy(config)
    self.workdir = os.path.abspath(workdir)
    self.devices = devices
    self.built = False
    self.results: dict[str, dict] = {}  # the last `fit`'s
    self.preempted_at: int | None = None  # the step a SIGTERM stopped `fit` at

  # ---- build ----------------------------------------------------------------------------------

  def build(self) -> Trainer:
    """Creates the mesh, resolves the data (generating the synthetic corpus if configured),
    builds the task, its optimizers and the sharded state. Returns self."""
    config = self.config
    os.makedirs(self.workdir, exist_ok=True)
    self.mesh = mesh_lib.make_mesh(config.mesh, self.devices)
    self.rules = shd.rules_from_config(config.sharding_rules)
    self.data_dir = None
    if config.data.source != "random":
      self.data_dir = data_setup.resolve_dir(config, self.workdir)
      if self.data_dir is not None:
        with config.unlocked():
          config.data.dir = self.data_dir
    self.text = data_setup.text_info(config, self.data_dir, self.workdir)
    self.task = task_lib.build(config, self.text)
    self.streams = dict(self.task.streams())
    accum = int(config.optim.grad_accum)
    if accum < 1:
      raise ValueError(f"optim.grad_accum={accum} must be >= 1")
    for name, stream in self.streams.items():
      size = self._stream_batch(stream)
      if size % accum:
        raise ValueError(f"optim.grad_accum={accum} must divide the batch size {size} of "
                         f"stream {name!r}")
    self._check_evals()
    profile_lib.parse_steps(config.get("profile_steps", ""))  # a bad spec fails before training
    names = list(jax.eval_shape(self.task.init_collections, jax.random.PRNGKey(0)))
    self.optimizers = optim.make_optimizers(config, names)
    txs = {n: tx for n, (tx, _) in self.optimizers.items()}
    self.state, self.shardings = state_lib.create_sharded_state(
        self.task.init_collections, txs, jax.random.PRNGKey(config.seed), self.mesh, self.rules)
    self.checkpointer = ckpt_lib.Checkpointer(self.workdir, keep=config.keep_ckpts)
    self.built = True
    return self

  def _stream_batch(self, stream: task_lib.Stream) -> int:
    return int(stream.batch_size or self.config.batch_size)

  def _check_evals(self) -> None:
    types = self.task.evaluators()
    for name, ev in self.config.get("evals", {}).items():
      if ev.get("type") not in types:
        raise ValueError(f"config.evals.{name}.type={ev.get('type')!r}: task "
                         f"{self.config.task!r} has evaluators {sorted(types)}")
      if not ev.get("split"):
        raise ValueError(f"config.evals.{name}.split is empty")

  def _require_built(self) -> None:
    if not self.built:
      raise RuntimeError("call Trainer.build() first")

  # ---- state ----------------------------------------------------------------------------------

  def apply_init(self) -> bool:
    """Applies `config.init` (another run's params, transformers checkpoints) to the state.

    Call it only for a run that does not resume from its own checkpoint. Returns whether
    `config.init` (or the task's `warm_start`) named anything.
    """
    self._require_built()
    init = self.config.get("init")
    warm = self.task.warm_start(self.workdir)
    if warm and not (init or {}).get("checkpoint", ""):
      init = copy.deepcopy(init) if init is not None else ml_collections.ConfigDict()
      # An import the warm run itself started from is in its params already, trained on;
      # importing it again would overwrite what that run learnt. Any other import applies.
      theirs = _run_init(warm)
      skipped = [k for k in self.task.pretrained_keys
                 if init.get(k, "") and init.get(k, "") == theirs.get(k, "")]
      with init.unlocked():
        init.checkpoint = warm
        for k in skipped:
          init[k] = ""
      if skipped:
        logging.info("warm start from %s: init.%s not imported again (that run started from "
                     "it)", warm, ", init.".join(skipped))
    if not init_lib.requested(init):
      logging.info("config.init names nothing: starting from a fresh init")
      return False
    params = init_lib.apply_init(init, self.task, self.state.params, self.shardings.params)
    self.state = self.state.replace(params=params)
    return True

  def abstract_state(self) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        self.state, self.shardings)

  def restore(self, step: int | None = None, loaders: Mapping[str, Any] | None = None
              ) -> int | None:
    """Loads checkpoint `step` (default: latest) into `self.state` (and the loaders'
    positions); returns the step, or None when the run has no checkpoint."""
    self._require_built()
    step = self.checkpointer.latest_step() if step is None else step
    if step is None:
      return None
    self.state = self.checkpointer.restore(step, self.abstract_state(), loaders)
    return step

  # ---- data -----------------------------------------------------------------------------------

  def batch_per_process(self, stream: task_lib.Stream) -> int:
    return shd.batch_size_per_process(self._stream_batch(stream), self.mesh, self.rules)

  def loaders(self) -> dict[str, Any]:
    """{stream name: infinite host-batch loader} of the task's streams."""
    self._require_built()
    return {name: data_setup.stream_loader(self.config, self.data_dir, self.text, stream,
                                           self.batch_per_process(stream))
            for name, stream in self.streams.items()}

  def device_batches(self, host: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """{stream: host batch} -> {stream: global sharded arrays of the stream's device keys}."""
    return shd.host_to_global(
        {name: select_keys(host[name], self.streams[name].keys, name) for name in self.streams},
        self.mesh, self.rules)

  # ---- the update -----------------------------------------------------------------------------

  def load_frozen(self) -> task_lib.Frozen | None:
    """The task's frozen pytrees (`Task.load_frozen`), placed on this run's mesh."""
    self._require_built()
    return self.task.load_frozen(self.mesh, self.rules, self.workdir)

  def update_fn(self, frozen: task_lib.Frozen | None = None):
    """The jitted `(state, batches) -> (state, metrics)` of this run (frozen params bound)."""
    self._require_built()
    txs = {n: tx for n, (tx, _) in self.optimizers.items()}
    schedules = {n: s for n, (_, s) in self.optimizers.items()}
    accum = int(self.config.optim.grad_accum)
    update = self.task.make_update(task_lib.UpdateContext(txs, schedules, accum))
    if update is None:
      update = update_lib.make_default_update(self.task.loss, txs, schedules, accum)
    else:
      update = update_lib.with_finite_check(update)
    return update_lib.jit_update(update, self.shardings, self.mesh, self.rules,
                                 None if frozen is None else frozen.params,
                                 None if frozen is None else frozen.shardings)

  # ---- evaluation -----------------------------------------------------------------------------

  def evaluate(self, step: int, writer: metrics_lib.MetricWriter, *, final: bool = True
               ) -> dict[str, dict]:
    """Runs the evaluators of `config.evals` that are due at `step` (all when `final`).

    Every evaluation logs `eval/num_clips` and `eval/num_queries` (rows evaluated: questions
    for QA). When the split's shards carry manifests (everything `launch.ingest` and the
    synthetic corpus write), a clip count that differs from what was written fails the
    evaluation with both numbers, or only warns with `config.eval.allow_missing`.

    Returns {eval name: logged metrics}; each is also written with `split` = the eval's split.
    Raises:
      EvalCountError: the count differs and missing clips are not allowed.
    """
    self._require_built()
    results = {}
    if self.config.data.source == "random":  # benchmark data: nothing to evaluate on
      return results
    evaluators = self.task.evaluators()
    n = int(self.config.eval_batch_size)
    per_process = shd.batch_size_per_process(n, self.mesh, self.rules)
    for name, ev in self.config.get("evals", {}).items():
      every = int(ev.get("every", 0))
      if not final and not (every and step % every == 0):
        continue
      t0 = time.time()
      loader = _Counted(data_setup.eval_loader(self.config, self.data_dir, ev.split, self.text,
                                               per_process))
      m = evaluators[ev.type](self.state.params, loader, self.mesh, self.rules, ev)
      if isinstance(m, tuple):
        m, arrays = m
        self._save_arrays(name, step, arrays)
      m["eval/num_clips"], m["eval/num_queries"] = loader.totals()
      self._check_count(ev.split, int(m["eval/num_clips"]))
      m["eval_seconds"] = time.time() - t0
      results[name] = writer.write(step, ev.split, m)
      logging.info("step %d %s (%s on %s): %s", step, name, ev.type, ev.split,
                   " ".join(f"{k}={v:.2f}" for k, v in m.items()))
    return results

  def _save_arrays(self, name: str, step: int, arrays: Mapping[str, Any]) -> None:
    """WORKDIR/eval/<name>/step_<step>.npz (process 0) for `launch.report`."""
    if jax.process_index() != 0 or not arrays:
      return
    directory = os.path.join(self.workdir, "eval", name)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"step_{step}.npz")
    with open(path + ".tmp", "wb") as f:
      np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
    os.replace(path + ".tmp", path)

  def _check_count(self, split: str, seen: int) -> None:
    expected = data_setup.expected_count(self.config, self.data_dir, split)
    if expected is None or expected == seen:
      return
    message = (f"evaluation of split {split!r} covered {seen} clips, but {expected} were "
               f"written to {self.data_dir} (a truncated or corrupt shard? see the warnings "
               "above)")
    if not bool(self.config.get("eval", {}).get("allow_missing", False)):
      raise EvalCountError(message + "; set --config.eval.allow_missing=True to report the "
                           "metrics over what is readable")
    logging.warning("%s; reporting over what is readable (eval.allow_missing)", message)

  # ---- training -------------------------------------------------------------------------------

  def fit(self, *, stop_at: int | None = None) -> dict[str, dict]:
    """Trains to `config.num_steps`, resuming from the run's latest checkpoint if any.

    On SIGTERM (see `Preemption`) it checkpoints at the next step boundary, flushes the
    metrics and returns with `self.preempted_at` = that step; a rerun resumes from there with
    the losses of an uninterrupted run.

    Args:
      stop_at: stop after this step (as if preempted), without the final evaluation.
    Returns:
      {"train": last logged train metrics, "<eval name>": last eval metrics, ...}, also kept
      as `self.results`.
    Raises:
      NonFiniteLossError: the loss became NaN/Inf (its step is in the message).
    """
    self._require_built()
    config = self.config
    if jax.process_index() == 0:
      with open(os.path.join(self.workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    loaders = self.loaders()
    start = self.restore(loaders=loaders)
    step = 0 if start is None else start
    if start is not None:
      logging.info("resumed from %s at step %d", self.checkpointer.directory, start)
    else:
      self.apply_init()
    frozen = self.load_frozen()
    step_fn = self.update_fn(frozen)
    writer = metrics_lib.MetricWriter(self.workdir, resume_step=step,
                                      wandb=config.get("wandb"), run_config=config.to_dict())
    preemption = Preemption()
    self.preempted_at = None
    progress = metrics_lib.Progress(step, config.num_steps, enabled=config.progress)
    results = self.results = {}
    history, previous = [], None
    t_log, steps_since_log = time.time(), 0
    iters = {name: iter(loader) for name, loader in loaders.items()}
    profiler = profile_lib.StepProfiler(config.get("profile_steps", ""),
                                        os.path.join(self.workdir, "profile"))
    try:
      while step < config.num_steps:
        profiler.before(step + 1)
        batches = self.device_batches({name: next(it) for name, it in iters.items()})
        self.state, metrics = step_fn(self.state, batches)
        step += 1
        profiler.after(step, metrics)
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
          m["data/skipped_clips"], m["data/corrupt_records"] = _data_losses(loaders)
          t_log, steps_since_log = time.time(), 0
          results["train"] = writer.write(step, "train", m)
          progress.update(step, m["loss"])
        else:
          progress.update(step)
        preempted = preemption.reached(step)
        if step % config.ckpt_every == 0 or last or step == stop_at or preempted:
          _check_finite(metrics, step)
          self.checkpointer.save(step, self.state, loaders)
        if preempted:
          self.preempted_at = step
          logging.warning("preempted (SIGTERM): checkpoint at step %d written; rerun the same "
                          "command to resume", step)
          break
        if not last:
          results.update(self.evaluate(step, writer, final=False))
        if stop_at is not None and step >= stop_at:
          break
      if step >= config.num_steps:
        results.update(self.evaluate(step, writer))
    finally:
      profiler.close()
      preemption.close()
      progress.close()
      self.checkpointer.close()  # waits for the last (async) save
      writer.close()
    return results


def _run_init(workdir: str) -> dict:
  """`config.init` of the run in `workdir` as its WORKDIR/config.json records it ({} if none)."""
  try:
    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
      return dict(json.load(f).get("init") or {})
  except FileNotFoundError:
    return {}


def _check_finite(metrics: dict, step: int) -> None:
  if not bool(jax.device_get(metrics["finite"])):
    shown = {k: float(jax.device_get(metrics[k])) for k in ("loss", "grad_norm") if k in metrics}
    raise NonFiniteLossError(
        f"non-finite training loss, gradient or parameter at step {step} ({shown}); stopping. "
        "The last checkpoint written before this step is kept.")


def _data_losses(loaders: Mapping[str, Any]) -> tuple[int, int]:
  """(clips skipped for a corrupt frame, records lost to corrupt shards), over all processes."""
  local = np.asarray([sum(int(getattr(l, key, 0)) for l in loaders.values())
                      for key in ("skipped", "corrupt_records")], np.int64)
  if jax.process_count() > 1:
    local = np.sum(multihost_utils.process_allgather(local), axis=0)
  return int(local[0]), int(local[1])


def train(config, workdir: str, *, stop_at: int | None = None, devices=None) -> dict:
  """`Trainer(config, workdir, devices).build().fit(stop_at=stop_at)`."""
  return Trainer(config, workdir, devices).build().fit(stop_at=stop_at)


def evaluate(config, workdir: str, step: int | None = None) -> tuple[int, dict[str, dict]]:
  """Evaluates checkpoint `step` (default: latest) of a run; never trains.

  A WORKDIR without checkpoints evaluates the weights `config.init` names (zero-shot, logged
  as step 0). Returns (step, {eval name: metrics}).
  Raises:
    FileNotFoundError: no checkpoint there and nothing in `config.init`.
  """
  trainer = Trainer(config, workdir).build()
  try:
    restored = trainer.restore(step=step)
    if restored is None:
      if step is not None or not init_lib.requested(trainer.config.get("init")):
        raise FileNotFoundError(f"no checkpoint in {trainer.checkpointer.directory} and no "
                                "config.init to evaluate")
      trainer.apply_init()
      restored = 0
    writer = metrics_lib.MetricWriter(trainer.workdir, tensorboard=False)
    try:
      return restored, trainer.evaluate(restored, writer)
    finally:
      writer.close()
  finally:
    trainer.checkpointer.close()
