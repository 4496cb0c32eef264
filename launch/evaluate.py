"""Evaluate a checkpoint of a run with the config's evaluators (`config.evals`); never trains.

  python -m launch.evaluate --config=configs/alpro_pretrain.py:demo --workdir=runs/demo [--step=N]

Zero-shot evaluation of another run's weights: a WORKDIR without checkpoints plus
`--config.init.checkpoint=PRETRAIN_WORKDIR` (logged as step 0).

Metrics are printed and appended to WORKDIR/metrics.jsonl under each evaluator's split.
"""
import json

from absl import app, flags

from launch import common

FLAGS = flags.FLAGS
common.define_run_flags("The run's directory (with checkpoints/).")
flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")


def main(argv):
  del argv
  common.setup(FLAGS)
  from vlp_jax.core import trainer
  try:
    step, results = trainer.evaluate(FLAGS.config, FLAGS.workdir, FLAGS.step)
  except FileNotFoundError as e:
    raise app.UsageError(str(e)) from None
  print(json.dumps({"step": step, **results}, indent=2))


if __name__ == "__main__":
  app.run(main)
