"""Checkpoints: orbax for the (sharded) train state, per-process files for the data position.

Layout under WORKDIR:
  checkpoints/<step>/...            orbax, written asynchronously, newest `keep` kept
  data_state/<step>/process_<i>/    each process's input-pipeline position at that step
"""
from __future__ import annotations

import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
  """Saves and restores (train state, data iterator position) at a step."""

  def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
    self.workdir = os.path.abspath(workdir)
    self.data_root = os.path.join(self.workdir, "data_state")
    self.manager = ocp.CheckpointManager(
        os.path.join(self.workdir, "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def _data_dir(self, step: int) -> str:
    return os.path.join(self.data_root, str(step), f"process_{jax.process_index()}")

  def save(self, step: int, state: Any, loader: Any) -> None:
    """Starts an async save of `state` and writes `loader`'s position synchronously."""
    if loader is not None and hasattr(loader, "save"):
      path = self._data_dir(step)
      os.makedirs(path, exist_ok=True)
      loader.save(os.path.join(path, "iterator"))
    self.manager.save(step, args=ocp.args.StandardSave(state))
    self._prune_data_states()

  def _prune_data_states(self) -> None:
    # Keep data positions of every step orbax may still restore (including in-flight saves).
    if not os.path.isdir(self.data_root):
      return
    steps = self.manager.all_steps()
    if not steps:
      return
    oldest = min(steps)
    for name in os.listdir(self.data_root):
      if name.isdigit() and int(name) < oldest:
        shutil.rmtree(os.path.join(self.data_root, name, f"process_{jax.process_index()}"),
                      ignore_errors=True)
        try:
          os.rmdir(os.path.join(self.data_root, name))
        except OSError:
          pass  # another process still has its files there

  def restore(self, step: int, abstract_state: Any, loader: Any) -> Any:
    """Restores the state into the shardings of `abstract_state` and the loader's position."""
    state = self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    if loader is not None and hasattr(loader, "restore"):
      if os.path.isdir(self._data_dir(step)):
        loader.restore(os.path.join(self._data_dir(step), "iterator"))
      else:
        logging.warning("No data position saved for step %d; the input pipeline restarts "
                        "from its beginning.", step)
    return state

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
