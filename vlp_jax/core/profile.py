"""`config.profile_steps`: a jax.profiler trace of a range of training steps."""
from __future__ import annotations

import os
from typing import Any

import jax
from absl import logging


def parse_steps(spec: str) -> tuple[int, int] | None:
  """"A:B" -> (A, B), 1-based and inclusive; "" -> None.

  Raises:
    ValueError: not two integers with 1 <= A <= B.
  """
  spec = str(spec or "").strip()
  if not spec:
    return None
  try:
    first, last = (int(x) for x in spec.split(":"))
  except ValueError:
    first, last = 0, -1
  if not 1 <= first <= last:
    raise ValueError(f"profile_steps must be 'A:B' with 1 <= A <= B (steps, 1-based), got "
                     f"{spec!r}")
  return first, last


class StepProfiler:
  """Starts a trace before step A runs and stops it once step B's outputs are computed.

  The trace (TensorBoard's profile plugin / Perfetto format) goes to `directory`; every
  process writes its own host's trace.
  """

  def __init__(self, spec: str, directory: str):
    self.steps = parse_steps(spec)
    self.directory = directory
    self.active = False

  def before(self, step: int) -> None:
    """Call before running `step` (1-based)."""
    if self.steps and step == self.steps[0] and not self.active:
      os.makedirs(self.directory, exist_ok=True)
      jax.profiler.start_trace(self.directory)
      self.active = True
      logging.info("profiling steps %d..%d into %s", *self.steps, self.directory)

  def after(self, step: int, outputs: Any) -> None:
    """Call after `step` with its outputs (waited for, so the trace holds the whole step)."""
    if self.active and step >= self.steps[1]:
      jax.block_until_ready(outputs)
      self.close()

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
