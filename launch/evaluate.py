"""Evaluate a checkpoint of a run on the config's eval splits.

  python -m launch.evaluate --config=configs/alpro_pretrain.py:demo --workdir=runs/demo [--step=N]

Zero-shot evaluation of another run's weights: a WORKDIR without checkpoints plus
`--config.init.checkpoint=PRETRAIN_WORKDIR` (logged as step 0).

Metrics are printed and appended to WORKDIR/metrics.jsonl under each split's name.
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
  from vlp_jax.train import loop, metrics
  run = loop.Run(FLAGS.config, FLAGS.workdir)
  step = run.restore(step=FLAGS.step)
  if step is None:
    # Zero-shot: a run of its own with no checkpoint evaluates the weights `config.init`
    # names (e.g. init.checkpoint = a pre-training WORKDIR).
    init = FLAGS.config.get("init")
    if FLAGS.step is not None or init is None or not any(
        init.get(k, "") for k in ("checkpoint", "text", "video")):
      raise app.UsageError(f"no checkpoint in {run.checkpointer.manager.directory} and no "
                           "config.init.checkpoint / init.text / init.video to evaluate")
    run.apply_init()
    step = 0
  writer = metrics.MetricWriter(run.workdir, tensorboard=False)
  results = run.evaluate(step, writer)
  run.checkpointer.close()
  print(json.dumps({"step": step, **results}, indent=2))


if __name__ == "__main__":
  app.run(main)
