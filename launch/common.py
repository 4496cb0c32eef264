"""Flags and process setup shared by the entry points."""
from __future__ import annotations

import os

from absl import flags, logging


def define_distributed_flags() -> None:
  flags.DEFINE_string("coordinator", None,
                      "host:port of process 0 for multi-process runs (jax.distributed).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator).")
  flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator).")
  flags.DEFINE_boolean("distributed", False,
                       "Call jax.distributed.initialize() with cluster auto-detection "
                       "(TPU pods, SLURM, Open MPI).")


def setup(FLAGS) -> None:
  """Hides GPUs/TPUs from TensorFlow, initialises jax.distributed, logs the topology."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import jax
  if FLAGS.coordinator:
    jax.distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
  elif FLAGS.distributed:
    jax.distributed.initialize()
  try:
    import tensorflow as tf  # the input pipeline must not claim accelerator memory
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")
  except (ImportError, RuntimeError, ValueError):
    pass
  logging.info("process %d/%d, %d local / %d global devices (%s)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
