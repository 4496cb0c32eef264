"""Write the synthetic "moving shapes" corpus as mp4 videos plus annotation files.

  python -m launch.synthetic_videos --out=data/shapes_videos [--preset=demo]
      [--num_train=N --num_val=N --num_test=N --num_test_unseen=N --num_images=N
       --num_frames=F --image_size=S --seed=K] [--workers=W] [--data_dir=DIR]

Sizes default to the preset's `data.synthetic` section of configs/alpro_pretrain.py (the
corpus that preset would generate as TFRecords); explicit flags override them. The output is
what `python -m launch.ingest` reads (files: vlp_jax/data/synthetic_videos.py); the command
prints the ingest commands that build a dataset in --data_dir (default OUT/records), which
then trains with `--config.data.dir=DIR --config.data.synthetic.generate=False`.
"""
import os
import sys

from absl import app, flags

# Nothing heavy at module level: spawned workers re-import this module.

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output directory for videos/, images/ and annotations.")
flags.DEFINE_enum("preset", "demo", ["tiny", "demo"],
                  "Sizes from configs/alpro_pretrain.py:<preset> data.synthetic.")
flags.DEFINE_integer("num_train", None, "Training clips (default: the preset's).")
flags.DEFINE_integer("num_val", None, "Validation clips.")
flags.DEFINE_integer("num_test", None, "Test clips.")
flags.DEFINE_integer("num_test_unseen", None, "Clips of held-out shape-colour pairs.")
flags.DEFINE_integer("num_images", None, "Still images (split `images`); 0 = none.")
flags.DEFINE_integer("num_frames", None, "Frames per clip.")
flags.DEFINE_integer("image_size", None, "Frame side in pixels; must be even (yuv420p).")
flags.DEFINE_integer("seed", None, "Corpus seed.")
flags.DEFINE_integer("num_shards", None, "Shards per split in the printed ingest commands.")
flags.DEFINE_integer("crf", 18, "x264 constant-rate factor (0-51, lower = better quality).")
flags.DEFINE_integer("workers", os.cpu_count() or 1, "Rendering processes (0 = in-process).")
flags.DEFINE_string("data_dir", None, "Dataset directory the printed ingest commands write "
                    "(the configs' data.dir); default OUT/records.")
flags.DEFINE_boolean("progress", True, "Show a progress bar.")
flags.mark_flag_as_required("out")

_SIZE_FLAGS = ("num_train", "num_val", "num_test", "num_test_unseen", "num_images",
               "num_frames", "image_size", "seed", "num_shards")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from configs import alpro_pretrain
  from vlp_jax.data import synthetic_videos
  sizes = alpro_pretrain.get_config(FLAGS.preset).data.synthetic
  values = {k: getattr(FLAGS, k) if getattr(FLAGS, k) is not None else sizes.get(k, 0)
            for k in _SIZE_FLAGS}
  num_shards = values.pop("num_shards")
  try:
    summary = synthetic_videos.write(FLAGS.out, **values, workers=FLAGS.workers,
                                     crf=FLAGS.crf, progress=FLAGS.progress)
  except (ValueError, FileExistsError) as e:
    sys.exit(f"synthetic_videos: {e}")
  data_dir = FLAGS.data_dir or os.path.join(FLAGS.out, "records")
  print(synthetic_videos.format_summary(summary, data_dir, num_shards))


if __name__ == "__main__":
  app.run(main)
