"""Train a model from a config.

  python -m launch.train --config=configs/alpro_pretrain.py:demo --workdir=runs/demo \
      [--config.optim.lr=3e-4 ...]

Resumes automatically from the latest checkpoint in --workdir. Multi-host: run the same
command on every host; `jax.distributed.initialize()` is called when --coordinator is given
(or by the cluster environment on TPU / SLURM, see launch/README of the cluster scripts).
"""
from absl import app, flags
from ml_collections import config_flags

from launch import common

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file and preset: FILE.py:PRESET[,k=v]",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and generated data.")
flags.mark_flags_as_required(["config", "workdir"])
common.define_distributed_flags()


def main(argv):
  del argv
  common.setup(FLAGS)
  from vlp_jax.train import loop
  loop.train(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
