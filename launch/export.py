"""Export a trained run: `transformers` checkpoints (and for ALPRO a `jax.export` artifact).

  python -m launch.export --workdir=runs/demo --out=runs/demo/export [--step=N]

Reads WORKDIR/config.json (written by launch.train), the run's tokenizer and its latest (or
--step) checkpoint, then writes what the run's task exports (`Task.export`; see
vlp_jax/convert/export.py), and OUT/export.json. ALPRO runs:
  OUT/bert/          BertForMaskedLM + tokenizer   (transformers from_pretrained)
  OUT/timesformer/   TimesformerModel
  OUT/alpro_heads.safetensors   projections, temperature, VTM (and QA / PEM) heads
  OUT/artifact/      encode_video / encode_text (jax.export) + params + vocab.txt +
                     load_artifact.py (runs with jax, numpy and tokenizers only)
`clip_pretrain` runs: OUT itself is a transformers CLIPModel directory with the tokenizer
(`CLIPModel.from_pretrained(OUT)`, `AutoTokenizer.from_pretrained(OUT)`).
A task that exports nothing is an error naming it. Params are restored onto one CPU device
and converted one tensor at a time: peak host memory is about the size of the params in
float32 plus one tensor.
"""
import json

from absl import app, flags

from launch import common

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The run's directory (config.json, checkpoints/).")
flags.DEFINE_string("out", None, "Output directory.")
flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
flags.DEFINE_list("platforms", ["cpu", "cuda", "tpu"],
                  "Platforms a jax.export artifact (ALPRO's) is lowered for.")
flags.mark_flags_as_required(["workdir", "out"])
common.define_distributed_flags()


def main(argv):
  del argv
  common.setup(FLAGS, tensorflow=False)  # export reads no data
  from vlp_jax.convert import export
  summary = export.export_run(FLAGS.workdir, FLAGS.out, FLAGS.step, tuple(FLAGS.platforms))
  print(json.dumps(summary, indent=2))


if __name__ == "__main__":
  app.run(main)
