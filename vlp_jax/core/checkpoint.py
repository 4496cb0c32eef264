"""Checkpoints: the train state and the data streams' positions as one orbax unit per step.

Layout under WORKDIR:
  checkpoints/<step>/state/              the (sharded) train state, written asynchronously
  checkpoints/<step>/data/process_<i>/   each process's input-pipeline position per stream
orbax writes a step into a temporary directory and commits it whole, so a step that exists
holds both items; the newest `keep` steps are kept. `latest_step` is the one way to find a
run's newest step.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any
from collections.abc import Mapping

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

STATE, DATA = "state", "data"


def checkpoint_dir(workdir: str) -> str:
  """WORKDIR/checkpoints when it exists, else the path itself (a `checkpoints/` directory)."""
  path = os.path.abspath(workdir)
  sub = os.path.join(path, "checkpoints")
  return sub if os.path.isdir(sub) else path


def all_steps(workdir: str) -> list[int]:
  """Committed checkpoint steps of a run (ascending); [] when there are none."""
  path = checkpoint_dir(workdir)
  if not os.path.isdir(path):
    return []
  return sorted(ocp.utils.checkpoint_steps(path))  # finalized steps only


def latest_step(workdir: str) -> int | None:
  """The newest committed checkpoint step of a run (its WORKDIR), or None."""
  steps = all_steps(workdir)
  return steps[-1] if steps else None


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (disk full, permissions); earlier steps are kept."""


class _DataPositionHandler(ocp.CheckpointHandler):
  """Every process writes (and reads) its own loaders' positions under process_<i>/<stream>."""

  def _dir(self, directory) -> str:
    return os.path.join(os.fspath(directory), f"process_{jax.process_index()}")

  def save(self, directory, args: DataSave) -> None:
    root = self._dir(directory)
    os.makedirs(root, exist_ok=True)
    for name, loader in args.loaders.items():
      loader.save(os.path.join(root, name))

  def restore(self, directory, args: DataRestore) -> None:
    root = self._dir(directory)
    for name, loader in args.loaders.items():
      loader.restore(os.path.join(root, name))

  def metadata(self, directory) -> None:
    del directory
    return None


@ocp.args.register_with_handler(_DataPositionHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
  """{stream name: loader with `save(path)`}."""
  loaders: Mapping[str, Any]


@ocp.args.register_with_handler(_DataPositionHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
  """{stream name: loader with `restore(path)`}."""
  loaders: Mapping[str, Any]


def read_handlers() -> dict[str, ocp.CheckpointHandler]:
  """Item handlers for reading a run's checkpoints without its loaders (params only)."""
  return {STATE: ocp.PyTreeCheckpointHandler(), DATA: _DataPositionHandler()}


def _positional(loaders: Mapping[str, Any] | None) -> dict[str, Any]:
  return {k: v for k, v in (loaders or {}).items() if hasattr(v, "save")}


class Checkpointer:
  """Saves and restores (train state, data stream positions) of a run, one unit per step."""

  def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def _failed(self, step: int | None, error: Exception) -> CheckpointWriteError:
    good = [s for s in all_steps(self.directory) if step is None or s != step]
    what = "a checkpoint" if step is None else f"checkpoint {step}"
    return CheckpointWriteError(
        f"writing {what} in {self.directory} failed: {type(error).__name__}: {error}. "
        f"The last good checkpoint ({good[-1] if good else 'none'}) is kept; a rerun resumes "
        "from it")

  def save(self, step: int, state: Any, loaders: Mapping[str, Any] | None = None) -> None:
    """Starts an async save of `state`; the loaders' positions are written before it returns
    (they change with the next batch).

    Raises:
      CheckpointWriteError: this save, or the previous asynchronous one, failed.
    """
    items = {STATE: ocp.args.StandardSave(state)}
    loaders = _positional(loaders)
    if loaders:
      items[DATA] = DataSave(loaders)
    try:
      self.manager.save(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax raises what the file system raised, of any type
      raise self._failed(step, e) from e

  def restore(self, step: int, abstract_state: Any,
              loaders: Mapping[str, Any] | None = None) -> Any:
    """Restores the state into the shardings of `abstract_state`, and the loaders' positions
    when given and saved (a step saved without them restarts the streams, with a warning)."""
    items = {STATE: ocp.args.StandardRestore(abstract_state)}
    loaders = _positional(loaders)
    if loaders and (epath.Path(self.directory) / str(step) / DATA).exists():
      items[DATA] = DataRestore(loaders)
    elif loaders:
      logging.warning("checkpoint %d has no data positions; the input streams restart from "
                      "their beginning", step)
    return self.manager.restore(step, args=ocp.args.Composite(**items))[STATE]

  def wait(self) -> None:
    """Blocks until the last save is on disk; raises `CheckpointWriteError` if it failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # the async save's error, of any type
      raise self._failed(None, e) from e

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()
