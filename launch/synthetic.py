"""Write the synthetic "moving shapes" corpus (TFRecords) that a config generates, into a
directory of your choice.

  python -m launch.synthetic --config=configs/clip_pretrain.py:demo --out=runs/clip/data_sm \
      [--config.data.synthetic.labels=shape_motion ...]

The corpus is the one the preset's `data.synthetic` section describes (what `launch.train`
with `data.synthetic.generate` writes into WORKDIR/data); a directory that already holds it
(same parameters in its DONE marker) is left alone. Frames and captions depend only on the
seed and the sizes, so two corpora that differ only in `data.synthetic.labels` hold the same
clips under different class labels. Prints a JSON summary on the last line.
"""
import json

from absl import app, flags

from launch import common

FLAGS = flags.FLAGS
common.define_config_flag()
flags.DEFINE_string("out", None, "Output data directory.")
flags.mark_flag_as_required("out")


def main(argv):
  del argv
  from vlp_jax.data import synthetic  # noqa: PLC0415  (absl parses flags first)
  summary = synthetic.ensure(FLAGS.out, FLAGS.config.data.synthetic)
  print(json.dumps(summary or dict(dir=FLAGS.out, existing=True), default=str))


if __name__ == "__main__":
  app.run(main)
