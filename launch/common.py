"""Flags and process setup shared by the entry points."""
from __future__ import annotations

import logging as logging_std
import os

from absl import flags, logging


def define_config_flag() -> None:
  """--config (FILE.py:PRESET[,k=v], with --config.a.b=v overrides), required."""
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None,
                                  "Config file and preset: FILE.py:PRESET[,k=v]",
                                  lock_config=True)
  flags.mark_flags_as_required(["config"])


def define_run_flags(workdir_help: str) -> None:
  """--config, --workdir (required) and the distributed flags."""
  define_config_flag()
  flags.DEFINE_string("workdir", None, workdir_help)
  flags.mark_flags_as_required(["workdir"])
  define_distributed_flags()


def define_distributed_flags() -> None:
  flags.DEFINE_string("coordinator", None,
                      "host:port of process 0 for multi-process runs (jax.distributed).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator).")
  flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator).")
  flags.DEFINE_boolean("distributed", False,
                       "Call jax.distributed.initialize() with cluster auto-detection "
                       "(TPU pods, SLURM, Open MPI).")


class _QuietLibraries(logging_std.Filter):
  """Drops INFO records of orbax / jax internals (dozens of lines per checkpoint)."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    noisy = any(p in record.pathname for p in ("/orbax/", "/jax/_src/", "/tensorboardX/"))
    return record.levelno >= logging_std.WARNING or not noisy


def setup(FLAGS, tensorflow: bool = True) -> None:
  """Hides GPUs/TPUs from TensorFlow, initialises jax.distributed, logs the topology.

  `tensorflow=False` for entry points that read no data (TensorFlow is then not imported).
  """
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  import jax
  if FLAGS.coordinator:
    jax.distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
  elif FLAGS.distributed:
    jax.distributed.initialize()
  if tensorflow:
    try:
      import tensorflow as tf  # the input pipeline must not claim accelerator memory
      tf.config.set_visible_devices([], "GPU")
      tf.config.set_visible_devices([], "TPU")
    except (ImportError, RuntimeError, ValueError):
      pass
  logging.info("process %d/%d, %d local / %d global devices (%s)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
