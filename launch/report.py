"""Figures of a run as PNG files (loss terms and lr, evaluation metrics over steps, retrieval
similarity heat-map and rank histogram, confusion matrix).

  python -m launch.report --workdir=runs/demo [--out=runs/demo/report]

See vlp_jax/eval/report.py for the list of figures.
"""
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The run's directory (metrics.jsonl, eval/).")
flags.DEFINE_string("out", None, "Output directory; default WORKDIR/report.")
flags.mark_flag_as_required("workdir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from vlp_jax.eval import report
  try:
    paths = report.write_report(FLAGS.workdir, FLAGS.out)
  except FileNotFoundError as e:
    raise app.UsageError(str(e)) from None
  print("\n".join(paths))


if __name__ == "__main__":
  app.run(main)
