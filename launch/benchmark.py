"""Benchmark a config's training step on random device batches (no TensorFlow needed).

  python -m launch.benchmark --config=configs/alpro_pretrain.py:demo [--config.a.b=v ...] \
      [--steps=10 --warmup=2]

Prints a readable table, then, as its last line, one JSON object: `step_time_s` (median),
`step_time_min_s`, `examples_per_s`, `compile_s`, `flops_per_step` (XLA cost analysis),
`tflops_per_s`, `mfu` (null where the device's peak is unknown), `peak_memory_bytes` (the
device's memory stats, else the compiled step's memory analysis), `devices`, `platform`.

  python -m launch.benchmark --config=configs/alpro_pretrain.py:demo --input_only

measures the tf.data input pipeline alone instead: training clips per second (and per core)
from JPEG records it writes, 4 and 8 frames at 224 px (`input_clips_per_s`).
"""
import json

from absl import app, flags

from launch import common

FLAGS = flags.FLAGS
common.define_config_flag()
common.define_distributed_flags()
flags.DEFINE_integer("steps", 10, "Timed steps.")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
flags.DEFINE_bool("input_only", False, "Measure the input pipeline alone (clips/s).")


def main(argv):
  del argv
  common.setup(FLAGS, tensorflow=FLAGS.input_only)
  if FLAGS.input_only:
    from vlp_jax.data import input_benchmark
    figures = input_benchmark.run(FLAGS.config)
    for t, rate in figures["input_clips_per_s"].items():
      print(f"{t} frames x {figures['image_size']} px: {rate:.1f} clips/s, "
            f"{figures['input_clips_per_s_per_core'][t]:.1f} per core ({figures['cores']} cores)")
    print(json.dumps(figures))
    return
  from vlp_jax.core import benchmark
  figures = benchmark.run(FLAGS.config, steps=FLAGS.steps, warmup=FLAGS.warmup)
  print(benchmark.table(figures))
  print(json.dumps(figures))


if __name__ == "__main__":
  app.run(main)
