"""Train a model from a config.

  python -m launch.train --config=configs/alpro_pretrain.py:demo --workdir=runs/demo \
      [--config.optim.model.lr=3e-4 ...]

Resumes automatically from the latest checkpoint in --workdir. On SIGTERM (a preemption
notice) it checkpoints at the next step boundary and exits 0; rerunning resumes from there.
When the config file defines `stages(config, workdir)` (e.g. ALPRO's PEM prompter), those runs
are trained first unless complete (launch/stages.py). Multi-host: run the same command on
every host with --coordinator=HOST:PORT --num_processes=N --process_id=I, or with
--distributed to let `jax.distributed.initialize()` detect a TPU pod, SLURM or Open MPI.
"""
from absl import app, flags
from ml_collections import config_flags

from launch import common

FLAGS = flags.FLAGS
common.define_run_flags("Directory for checkpoints, metrics and generated data.")
flags.DEFINE_string("profile_steps", None,
                    "A:B: write a jax.profiler trace of steps A..B into WORKDIR/profile "
                    "(same as --config.profile_steps).")


def main(argv):
  del argv
  common.setup(FLAGS)
  from launch import stages
  module = stages.config_module(config_flags.get_config_filename(FLAGS["config"]))
  config = FLAGS.config
  if FLAGS.profile_steps is not None:
    with config.unlocked():
      config.profile_steps = FLAGS.profile_steps
  run = stages.train(config, FLAGS.workdir, getattr(module, "stages", None))
  if run.preempted_at is not None:
    print(f"preempted: {run.workdir} stopped after step {run.preempted_at} with a checkpoint; "
          "rerun the same command to resume", flush=True)


if __name__ == "__main__":
  app.run(main)
