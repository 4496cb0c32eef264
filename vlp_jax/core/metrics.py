"""Metric output: WORKDIR/metrics.jsonl, TensorBoard event files, a console progress bar.

Only process 0 writes; every process may call the methods.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from typing import Any
from collections.abc import Mapping

import jax
import numpy as np
import tensorboardX


def _to_float(v: Any) -> float:
  return float(np.asarray(v))


def mean_metrics(history: list[Mapping[str, Any]]) -> dict[str, float]:
  """Averages a list of per-step metric dicts (device or host scalars) key by key."""
  if not history:
    return {}
  fetched = jax.device_get(history)
  return {k: float(np.mean([_to_float(m[k]) for m in fetched if k in m])) for k in fetched[0]}


class MetricWriter:
  """Writes `{"step", "split", **metrics}` lines to metrics.jsonl and scalars to TensorBoard
  (and to Weights & Biases when `wandb.enabled`).

  Args:
    resume_step: the step training (re)starts from. Rows past it, written by a run that went
      further before it was stopped, are dropped from metrics.jsonl and purged from
      TensorBoard, so the replayed steps are not logged twice. None (evaluation) keeps every
      row.
    wandb: the config's `wandb` section (`enabled`, `project`, `name`, `mode`: online /
      offline); the W&B run id is kept in WORKDIR/wandb_id.txt, so a resumed run continues it.
    run_config: the resolved config as a dict, recorded with the W&B run.
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True, resume_step: int | None = None,
               wandb: Mapping[str, Any] | None = None, run_config: dict | None = None):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      if resume_step is not None:
        _drop_rows_after(self.path, int(resume_step))
      if tensorboard:
        purge = None if resume_step is None else int(resume_step) + 1
        self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"),
                                              purge_step=purge)
    self._wandb = None
    if self.active and wandb and wandb.get("enabled", False):
      self._wandb = _wandb_run(workdir, wandb, run_config)

  def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> dict:
    """Appends one event; non-finite values are written as null in JSON (and skipped in TB)."""
    values = {k: _to_float(v) for k, v in metrics.items()}
    if self.active:
      row = {"step": int(step), "split": split}
      row.update({k: (v if math.isfinite(v) else None) for k, v in values.items()})
      with open(self.path, "a") as f:
        f.write(json.dumps(row) + "\n")
      if self._tb is not None:
        for k, v in values.items():
          if math.isfinite(v):
            # TensorBoard tag names allow [A-Za-z0-9_./-]: "R@1" -> "R_1".
            self._tb.add_scalar(f"{split}/{k}".replace("@", "_"), v, step)
        self._tb.flush()
      if self._wandb is not None:
        self._wandb.log({f"{split}/{k}": v for k, v in values.items() if math.isfinite(v)},
                        step=int(step))
    return values

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()
      self._wandb = None


def _wandb_run(workdir: str, cfg: Mapping[str, Any], run_config: dict | None):
  """A W&B run for WORKDIR, resumed when WORKDIR/wandb_id.txt names one."""
  try:
    import wandb  # noqa: PLC0415  (optional: pip install wandb)
  except ImportError as e:
    raise ImportError("wandb.enabled=True needs the wandb package: pip install wandb") from e
  id_path = os.path.join(workdir, "wandb_id.txt")
  if os.path.exists(id_path):
    with open(id_path) as f:
      run_id = f.read().strip()
  else:
    run_id = uuid.uuid4().hex[:12]
    with open(id_path, "w") as f:
      f.write(run_id)
  return wandb.init(project=cfg.get("project") or "vlp_jax",
                    name=cfg.get("name") or os.path.basename(os.path.abspath(workdir)),
                    mode=cfg.get("mode") or "online", dir=workdir, id=run_id, resume="allow",
                    config=run_config)


def _drop_rows_after(path: str, step: int) -> None:
  """Rewrites metrics.jsonl without its rows past `step` (atomically)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  keep = [line for line in lines if json.loads(line)["step"] <= step]
  if len(keep) == len(lines):
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(keep)
  os.replace(tmp, path)


def read_metrics(workdir: str) -> list[dict]:
  """All events of WORKDIR/metrics.jsonl, in order."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class Progress:
  """One console line: step, steps/s, ETA and the latest loss; redrawn at most twice a second."""

  def __init__(self, start: int, total: int, enabled: bool = True):
    self.start, self.total = start, total
    self.t0 = time.time()
    self.last_draw = 0.0
    self.enabled = enabled and jax.process_index() == 0
    self.loss = float("nan")
    self._compiled = False

  def update(self, step: int, loss: float | None = None) -> None:
    if loss is not None:
      self.loss = loss
    now = time.time()
    if not self._compiled:  # rate from the end of the first (compiling) step
      self._compiled = True
      self.start, self.t0 = step, now
    if not self.enabled or (now - self.last_draw < 0.5 and step < self.total):
      return
    self.last_draw = now
    done = step - self.start
    rate = done / max(now - self.t0, 1e-9)
    eta = (self.total - step) / rate if rate > 0 else float("inf")
    frac = step / max(self.total, 1)
    bar = "#" * int(30 * frac)
    eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "--:--:--"
    loss = f"{self.loss:.4f}" if math.isfinite(self.loss) else "-"
    sys.stderr.write(f"\r[{bar:<30}] {step}/{self.total} {rate:.2f} steps/s ETA {eta_s} "
                     f"loss {loss} ")
    sys.stderr.flush()

  def close(self) -> None:
    if self.enabled:
      sys.stderr.write("\n")
