"""Build PEM's entity vocabulary: the top-K nouns of a caption corpus, one per line.

  python -m launch.entities --source=DATA_DIR [--splits=train,images] [--out=DATA_DIR/entities.txt]
      [--top_k=1000] [--method=auto|spacy|nltk|frequency] [--candidates=NOUNS.txt]

`--source` is a data directory of TFRecord shards (captions of the named splits), a `.jsonl`
file (field `caption`, `captions` or `text`) or a text file with one caption per line.
Nouns come from spaCy (`en_core_web_sm`) or NLTK's tagger when installed, else from the
documented word-list fallback (vlp_jax/data/entities.py); `--candidates` counts only the
nouns of a user list. The pre-training config reads the file through `pem.entities`
("" = DATA_DIR/entities.txt).
"""
import os

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("source", None, "Data directory (TFRecord splits), .jsonl or .txt file.")
flags.DEFINE_list("splits", ["train"], "Splits to read when --source is a directory.")
flags.DEFINE_string("out", None, "Output file; default SOURCE_DIR/entities.txt for a directory.")
flags.DEFINE_integer("top_k", 1000, "Number of entities (ALPRO: 1000).")
flags.DEFINE_enum("method", "auto", ["auto", "spacy", "nltk", "frequency"],
                  "Noun finder; auto = spacy, then nltk, then the frequency fallback.")
flags.DEFINE_string("candidates", None, "Count only the nouns of this file (one per line).")
flags.DEFINE_integer("min_count", 1, "Drop nouns seen fewer times.")
flags.mark_flag_as_required("source")


def main(argv):
  del argv
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from vlp_jax.data import entities
  out = FLAGS.out
  if out is None:
    if not os.path.isdir(FLAGS.source):
      raise app.UsageError("--out is required when --source is a file")
    out = os.path.join(FLAGS.source, "entities.txt")
  candidates = None
  if FLAGS.candidates:
    with open(FLAGS.candidates, encoding="utf-8") as f:
      candidates = [line.split()[0] for line in f if line.strip()]
  captions = entities.read_captions(FLAGS.source, FLAGS.splits)
  top, method = entities.top_entities(captions, FLAGS.top_k, FLAGS.method, candidates,
                                      FLAGS.min_count)
  if not top:
    raise app.UsageError(f"no nouns found in {FLAGS.source!r}")
  entities.write_entities(out, [w for w, _ in top])
  print(f"{len(top)} entities ({method}) -> {out}")
  print("top: " + ", ".join(f"{w} ({n})" for w, n in top[:20]))
  if len(top) < FLAGS.top_k:
    print(f"note: only {len(top)} distinct nouns, fewer than --top_k={FLAGS.top_k}")


if __name__ == "__main__":
  app.run(main)
