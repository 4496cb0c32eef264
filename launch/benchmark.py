"""Benchmark a config's training step on random device batches (no TensorFlow needed).

  python -m launch.benchmark --config=configs/alpro_pretrain.py:demo [--config.a.b=v ...] \
      [--steps=10 --warmup=2]

Prints a readable table, then, as its last line, one JSON object: `step_time_s` (median),
`step_time_min_s`, `examples_per_s`, `compile_s`, `flops_per_step` (XLA cost analysis),
`tflops_per_s`, `mfu` (null where the device's peak is unknown), `peak_memory_bytes` (the
device's memory stats, else the compiled step's memory analysis), `devices`, `platform`.

  python -m launch.benchmark --config=configs/alpro_pretrain.py:bench --compare=torch

times ALPRO's VTC step (VTM/MLM/PEM weights set to 0) and, in the same run, the PyTorch eager
reference at the same shapes (HF TimesformerModel + BertModel, AdamW; vlp_jax/core/
torch_reference.py; needs torch and transformers), adding `torch_step_time_s` and
`speedup_vs_torch` (torch time / vlp_jax time), and both libraries' float32 GEMM throughput
at the shape of the video MLP's GEMMs (`gemm_shape` = tokens, hidden, mlp), forward and
weight-gradient: `gemm_forward_vs_torch`, `gemm_weight_grad_vs_torch` (ours / torch's).

  python -m launch.benchmark --config=configs/alpro_pretrain.py:demo --input_only

measures the tf.data input pipeline alone instead: training clips per second (and per core)
from JPEG records it writes, 4 and 8 frames at 224 px (`input_clips_per_s`), and

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m launch.benchmark \
      --config=configs/alpro_pretrain.py:demo --retrieval=20000

times retrieval ranks of 20k texts x 20k videos computed block by block over the mesh, with
each query's top `--rerank_k` candidates kept and re-ranked (eval/blockwise.py,
eval/rerank.py): seconds, bytes per device of a similarity block, peak host memory.
"""
import json

from absl import app, flags

from launch import common

FLAGS = flags.FLAGS
common.define_config_flag()
common.define_distributed_flags()
flags.DEFINE_integer("steps", 10, "Timed steps (0: compile only, e.g. compile time vs depth).")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
flags.DEFINE_enum("compare", "", ["", "torch"], "torch: also time the PyTorch eager "
                  "reference of ALPRO's VTC step (HF TimeSformer + BERT, AdamW) at the same "
                  "shapes, and report the ratio; the vlp_jax step is then VTC-only too.")
flags.DEFINE_bool("input_only", False, "Measure the input pipeline alone (clips/s).")
flags.DEFINE_integer("retrieval", 0, "N > 0: time block-by-block retrieval ranks of N texts "
                     "x N videos on the config's mesh instead (time, peak host memory).")
flags.DEFINE_integer("rerank_k", 16, "With --retrieval: candidates kept and re-ranked per "
                     "query (0 = ranks only).")


def main(argv):
  del argv
  common.setup(FLAGS, tensorflow=FLAGS.input_only)
  from vlp_jax.core import benchmark
  if FLAGS.retrieval:
    import resource

    import jax

    from vlp_jax.eval import blockwise
    from vlp_jax.parallel import mesh as mesh_lib
    from vlp_jax.parallel import sharding as shd
    mesh = mesh_lib.make_mesh(FLAGS.config.mesh, jax.devices())
    figures = blockwise.benchmark(FLAGS.retrieval, mesh,
                                  shd.rules_from_config(FLAGS.config.sharding_rules),
                                  k=FLAGS.rerank_k)
    # ru_maxrss: KiB on Linux.
    figures["peak_host_memory_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(benchmark.table(figures))
    print(json.dumps(figures))
    return
  if FLAGS.input_only:
    from vlp_jax.data import input_benchmark
    figures = input_benchmark.run(FLAGS.config)
    for t, rate in figures["input_clips_per_s"].items():
      print(f"{t} frames x {figures['image_size']} px: {rate:.1f} clips/s, "
            f"{figures['input_clips_per_s_per_core'][t]:.1f} per core ({figures['cores']} cores)")
    print(json.dumps(figures))
    return
  config = FLAGS.config
  if FLAGS.compare:
    config = benchmark.vtc_only(config)
  figures = benchmark.run(config, steps=FLAGS.steps, warmup=FLAGS.warmup)
  if FLAGS.compare == "torch":
    from vlp_jax.core import torch_reference
    figures.update(torch_reference.run(config, steps=FLAGS.steps, warmup=FLAGS.warmup))
    figures["speedup_vs_torch"] = figures["torch_step_time_s"] / figures["step_time_s"]
    # The step is mostly GEMMs: the same GEMM in both libraries bounds the step's ratio.
    shape = benchmark.mlp_gemm_shape(config)
    ours, theirs = benchmark.gemm_flops(shape), torch_reference.gemm_flops(shape)
    figures["gemm_shape"] = list(shape)
    for kind in ours:
      figures[f"gemm_{kind}_tflops"] = ours[kind] / 1e12
      figures[f"torch_gemm_{kind}_tflops"] = theirs[kind] / 1e12
      figures[f"gemm_{kind}_vs_torch"] = ours[kind] / theirs[kind]
  print(benchmark.table(figures))
  print(json.dumps(figures))


if __name__ == "__main__":
  app.run(main)
