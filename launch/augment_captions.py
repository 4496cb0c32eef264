"""MAMA's caption augmentation: caption a 3 x 4 grid of keyframes of every clip of a split.

  python -m launch.augment_captions --data_dir=DIR --captioner=MODEL_DIR \\
      [--split=train --out=DIR/<split>.captions.jsonl --keyframes=difference --batch_size=8 \\
       --prompt=... --seed=0 --limit=N]

--captioner: a local transformers model directory (image-to-text, e.g. a ViT-GPT2 captioner, or
an image-text-to-text chat model such as LLaVA-1.5), `module.path:function` (any importable
`fn(image, prompt) -> str`), or `template` (deterministic text, for dry runs).

Appends one JSON line per clip to --out (video_id, caption, captioner, prompt, seed, keyframes);
a rerun resumes where it stopped. Clips whose frames cannot be decoded or that get no caption
are listed in <out>.skipped.jsonl. Train with `--config.data.extra_captions=<out>`. The summary
is printed as JSON on the last line.
"""
import json
import os
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "Dataset directory (record shards).")
flags.DEFINE_string("split", "train", "Split to caption.")
flags.DEFINE_string("captioner", None,
                    "template | a local transformers model directory | module.path:function")
flags.DEFINE_string("out", None, "Side file (JSONL); default DATA_DIR/<split>.captions.jsonl.")
flags.DEFINE_enum("keyframes", "difference", ["difference", "density_peak", "uniform"],
                  "Keyframe selection: frame-difference peaks (MAMA's code), density-peak "
                  "clustering (MAMA's paper) or evenly spaced.")
flags.DEFINE_integer("num_keyframes", 12, "Keyframes per clip (a 3 x 4 grid for 12).")
flags.DEFINE_integer("rows", 3, "Grid rows; rows * columns = num_keyframes.")
flags.DEFINE_integer("batch_size", 8, "Grids per captioner call.")
flags.DEFINE_string("prompt", None, "Prompt of an image-text-to-text captioner; default MAMA's "
                    "'In a sentence, describe the process in the video.'")
flags.DEFINE_integer("max_new_tokens", 40, "Generation length limit (transformers captioners).")
flags.DEFINE_float("temperature", 0.2, "Sampling temperature (transformers); 0 = greedy.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_integer("limit", None, "Caption at most this many new clips in this run.")
flags.mark_flags_as_required(["data_dir", "captioner"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  # The captioner is read from disk only; set before transformers is imported.
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  from vlp_jax.methods.mama import augment, captioners
  if FLAGS.num_keyframes % FLAGS.rows:
    sys.exit(f"augment_captions: --num_keyframes={FLAGS.num_keyframes} does not fill "
             f"--rows={FLAGS.rows} rows")
  prompt = captioners.DEFAULT_PROMPT if FLAGS.prompt is None else FLAGS.prompt
  out = FLAGS.out or os.path.join(FLAGS.data_dir, f"{FLAGS.split}.captions.jsonl")
  try:
    captioner = captioners.build(FLAGS.captioner, max_new_tokens=FLAGS.max_new_tokens,
                                 temperature=FLAGS.temperature, prompt=prompt)
    summary = augment.augment(
        FLAGS.data_dir, FLAGS.split, captioner, out_path=out, keyframe_method=FLAGS.keyframes,
        num_keyframes=FLAGS.num_keyframes, rows=FLAGS.rows,
        cols=FLAGS.num_keyframes // FLAGS.rows, batch_size=FLAGS.batch_size, prompt=prompt,
        seed=FLAGS.seed, limit=FLAGS.limit)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"augment_captions: {e}")
  print(json.dumps(summary))


if __name__ == "__main__":
  app.run(main)
