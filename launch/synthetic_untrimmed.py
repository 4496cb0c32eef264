"""Write synthetic untrimmed moving-shapes videos and class-agnostic proposals (localisation).

  python -m launch.synthetic_untrimmed --out=data/untrimmed [--num_val=32 --num_test=64
      --num_train=0 --seed=0 --min_frames=48 --max_frames=64 --image_size=40 --fps=8
      --num_shards=2 --copies=5 --jitter=0.1 --num_false=3]

writes OUT/<split>-*.tfrecord (segment fields per video), OUT/proposals_<split>.json
(noisy-oracle proposals, ActivityNet style), OUT/classes.txt, OUT/vocab.txt and
OUT/untrimmed.json (vlp_jax/data/synthetic_untrimmed.py), then prints the summary as JSON.
"""
import json
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output directory.")
flags.DEFINE_integer("num_train", 0, "Videos of split train (0 = none).")
flags.DEFINE_integer("num_val", 32, "Videos of split val (0 = none).")
flags.DEFINE_integer("num_test", 64, "Videos of split test (0 = none).")
flags.DEFINE_integer("seed", 0, "Corpus seed.")
flags.DEFINE_integer("min_frames", 48, "Fewest frames of a video.")
flags.DEFINE_integer("max_frames", 64, "Most frames of a video.")
flags.DEFINE_integer("image_size", 40, "Frame side in pixels.")
flags.DEFINE_float("fps", 8.0, "Frames per second the frames are stored at.")
flags.DEFINE_integer("num_shards", 2, "Files per split.")
flags.DEFINE_integer("copies", 5, "Jittered proposals per ground-truth segment.")
flags.DEFINE_float("jitter", 0.1, "Proposal boundary noise, as a fraction of the segment length.")
flags.DEFINE_integer("num_false", 3, "False proposals per video.")
flags.mark_flag_as_required("out")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from vlp_jax.data import synthetic_untrimmed
  counts = dict(train=FLAGS.num_train, val=FLAGS.num_val, test=FLAGS.num_test)
  try:
    summary = synthetic_untrimmed.generate(
        FLAGS.out, seed=FLAGS.seed, counts=counts, min_frames=FLAGS.min_frames,
        max_frames=FLAGS.max_frames, image_size=FLAGS.image_size, fps=FLAGS.fps,
        num_shards=FLAGS.num_shards, copies=FLAGS.copies, jitter=FLAGS.jitter,
        num_false=FLAGS.num_false)
  except (ValueError, FileExistsError) as e:
    sys.exit(f"synthetic_untrimmed: {e}")
  print(json.dumps(summary, indent=1, sort_keys=True))


if __name__ == "__main__":
  app.run(main)
