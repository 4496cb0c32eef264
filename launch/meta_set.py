"""Build MAMA's meta set: a clean, balanced subset of a training split, held out of training.

  python -m launch.meta_set --data_dir=DIR --split=train --field=label --per_group=4 \
      [--out_split=meta --seed=0]

Writes split `--out_split` into DIR and DIR/<out_split>.ids.txt (train with
`--config.meta.split=<out_split> --config.data.exclude_ids=DIR/<out_split>.ids.txt`), and
prints the per-group counts. A group with fewer clips than --per_group is an error naming it.
"""
import json
import os
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "Dataset directory (record shards).")
flags.DEFINE_string("split", "train", "Split to draw the meta set from.")
flags.DEFINE_enum("field", "label", ["label", "label_text", "entity"],
                  "Record field whose groups are balanced.")
flags.DEFINE_integer("per_group", None, "Clips per group.")
flags.DEFINE_integer("seed", 0, "Selection seed.")
flags.DEFINE_string("out_split", "meta", "Name of the meta split.")
flags.mark_flags_as_required(["data_dir", "per_group"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from vlp_jax.data import meta_set
  try:
    summary = meta_set.build(FLAGS.data_dir, split=FLAGS.split, field=FLAGS.field,
                             per_group=FLAGS.per_group, seed=FLAGS.seed,
                             out_split=FLAGS.out_split)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    sys.exit(f"meta_set: {e}")
  print(json.dumps(summary, indent=1))


if __name__ == "__main__":
  app.run(main)
