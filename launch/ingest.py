"""Ingest real videos (or images) and their annotations into TFRecord shards.

  python -m launch.ingest --format=msrvtt --annotations=MSRVTT_data.json \\
      --video_list=MSRVTT_train.9k.csv --video_root=MSRVTT/videos/all --split=train \\
      --out=data/msrvtt [--fps=2 --short_side=256 --num_shards=8 --workers=8]

Writes OUT/<split>-XXXXX-of-XXXXX.tfrecord (the record schema of vlp_jax/data/records.py),
OUT/vocab.txt (unless it exists; --vocab copies a given one), OUT/skipped.jsonl,
OUT/partial.jsonl and OUT/ingest.json; train with `--config.data.dir=OUT`. A rerun resumes:
finished shards are kept. Annotation formats: see vlp_jax/data/ingest/annotations.py.

Defaults: 2 frames per second (ALPRO samples 4-16 frames uniformly over a whole clip; 2 fps
gives 16 distinct frames for any clip of 8 s or more), short side 256 (ALPRO resizes to 256
and crops 224), at most 64 frames per clip (longer clips are stored at a lower rate that
still spans the whole clip).
"""
import os
import sys

from absl import app, flags

# No tensorflow at module level: spawned decoding workers re-import this module.
from vlp_jax.data.ingest.annotations import FORMATS

FLAGS = flags.FLAGS
flags.DEFINE_enum("format", None, FORMATS, "Annotation format.")
flags.DEFINE_string("annotations", None, "Annotation file; the directory of the split files "
                    "for hmdb51 / thumos14 (ucf101: the directory or one list file).")
flags.DEFINE_string("video_root", None, "Directory the annotation's video/image names are in.")
flags.DEFINE_string("split", None, "Split name of the output files, e.g. train, val, test; "
                    "for hmdb51 / ucf101 (train, test), thumos14 (val, test) and activitynet "
                    "(training, validation, or train, val) also the subset read.")
flags.DEFINE_integer("split_id", 1, "Official split (1-3) of hmdb51 / ucf101.")
flags.DEFINE_string("out", None, "Output directory (the config's data.dir).")
flags.DEFINE_float("fps", 2.0, "Stored frames per second.")
flags.DEFINE_integer("short_side", 256, "Short side of the stored frames, pixels.")
flags.DEFINE_integer("max_frames", 64, "Most frames per clip; longer clips get a lower rate.")
flags.DEFINE_integer("jpeg_quality", 90, "JPEG quality, 1-100.")
flags.DEFINE_float("min_coverage", 0.5, "A damaged video is kept if its decoded frames cover "
                   "at least this fraction of the clip (listed in partial.jsonl).")
flags.DEFINE_integer("num_shards", 8, "Number of shard files; at least the number of hosts "
                     "that will read the split.")
flags.DEFINE_integer("workers", os.cpu_count() or 1, "Decoding processes (0 = in-process).")
flags.DEFINE_float("worker_timeout", 600.0, "Seconds a decoding worker may spend on one clip "
                   "before it is killed and the clip skipped (0 = no limit).")
flags.DEFINE_string("vocab", None, "vocab.txt to copy into OUT (e.g. bert-base-uncased's); "
                    "default: keep OUT/vocab.txt, or build it from this split's text.")
flags.DEFINE_integer("max_vocab_words", 30000, "Most words of a built vocab.txt.")
flags.DEFINE_string("classes", None, "Class list, one name per line (line i = label index i), "
                    "for kinetics / jsonl string labels; default: sorted labels of the file.")
flags.DEFINE_string("msvd_mapping", None, "youtube_mapping.txt for msvd_qa.")
flags.DEFINE_string("video_list", None, "Keep only these clip ids (one per line, or a CSV with "
                    "a video_id column).")
flags.DEFINE_boolean("overwrite", False, "Redo the split (delete its shards first) instead "
                     "of resuming.")
flags.DEFINE_boolean("progress", True, "Show a progress bar.")
flags.DEFINE_boolean("skip_bad_rows", False, "Skip malformed annotation lines (not JSON, not "
                     "an object; for hmdb51 / ucf101 / thumos14 / activitynet also unknown "
                     "classes and segments with end <= start), listing them in skipped.jsonl, "
                     "instead of stopping.")
flags.mark_flags_as_required(["format", "annotations", "video_root", "split", "out"])

for _name in ("vocab", "classes", "msvd_mapping", "video_list"):
  flags.register_validator(_name, lambda p: p is None or os.path.isfile(p),
                           message=f"--{_name} must name an existing file")
flags.register_validator("annotations", lambda p: p is None or os.path.exists(p),
                         message="--annotations must name an existing file or directory")
flags.register_validator("split_id", lambda v: v in (1, 2, 3),
                         message="--split_id must be 1, 2 or 3")
flags.register_validator("video_root", lambda p: p is None or os.path.isdir(p),
                         message="--video_root must name an existing directory")
flags.register_validator("fps", lambda v: v > 0, message="--fps must be > 0")
flags.register_validator("short_side", lambda v: v >= 8, message="--short_side must be >= 8")
flags.register_validator("max_frames", lambda v: v >= 1, message="--max_frames must be >= 1")
flags.register_validator("jpeg_quality", lambda v: 1 <= v <= 100,
                         message="--jpeg_quality must be in [1, 100]")
flags.register_validator("min_coverage", lambda v: 0 <= v <= 1,
                         message="--min_coverage must be in [0, 1]")
flags.register_validator("num_shards", lambda v: v >= 1, message="--num_shards must be >= 1")
flags.register_validator("workers", lambda v: v >= 0, message="--workers must be >= 0")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from vlp_jax.data.ingest import annotations, decode, run
  try:
    ann = annotations.parse(FLAGS.format, FLAGS.annotations, classes=FLAGS.classes,
                            msvd_mapping=FLAGS.msvd_mapping, video_list=FLAGS.video_list,
                            skip_bad_rows=FLAGS.skip_bad_rows, split=FLAGS.split,
                            split_id=FLAGS.split_id)
    settings = decode.DecodeSettings(
        video_root=FLAGS.video_root, fps=FLAGS.fps, short_side=FLAGS.short_side,
        max_frames=FLAGS.max_frames, jpeg_quality=FLAGS.jpeg_quality,
        min_coverage=FLAGS.min_coverage)
    print(f"{FLAGS.annotations}: {len(ann.clips)} clips ({FLAGS.format})", flush=True)
    summary = run.ingest(
        ann, out_dir=FLAGS.out, split=FLAGS.split, settings=settings,
        num_shards=FLAGS.num_shards, workers=FLAGS.workers, vocab=FLAGS.vocab,
        max_vocab_words=FLAGS.max_vocab_words, overwrite=FLAGS.overwrite,
        progress=FLAGS.progress, worker_timeout=FLAGS.worker_timeout,
        info=dict(format=FLAGS.format, annotations=os.path.abspath(FLAGS.annotations),
                  **({"split_id": FLAGS.split_id} if FLAGS.format in ("hmdb51", "ucf101")
                     else {})))
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    sys.exit(f"ingest: {e}")
  print(format_summary(summary, FLAGS.out))


def format_summary(s: dict, out: str) -> str:
  """Human-readable lines of a `run.ingest` summary."""
  lines = [f"split {s['split']!r}: {s['written']} of {s['clips']} clips written "
           f"({s['frames']} frames) into {s['shards']} shards in {out} "
           f"({s['shards_resumed']} shards kept from an earlier run), {s['seconds']:.1f} s"]
  if s["skipped"]:
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(s["skipped_by_reason"].items()))
    lines.append(f"skipped {s['skipped']} clips ({reasons}); see "
                 f"{os.path.join(out, 'skipped.jsonl')}")
  else:
    lines.append("skipped 0 clips")
  if s["partial"]:
    lines.append(f"kept {s['partial']} partially decoded clips; see "
                 f"{os.path.join(out, 'partial.jsonl')}")
  lines.append(f"vocab.txt: {s['vocab']['size']} tokens ({s['vocab']['source']})")
  return "\n".join(lines)


if __name__ == "__main__":
  app.run(main)
