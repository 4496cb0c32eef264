"""launch.benchmark: the figures of a step, as a table and a last-line JSON object."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_prints_step_figures():
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  env["JAX_PLATFORMS"] = "cpu"
  # MAMA's task: two streams, two collections and its own update, all through the core.
  for config in ("configs/mama_retrieval.py:tiny",):
    proc = subprocess.run([sys.executable, "-m", "launch.benchmark", f"--config={config}",
                           "--config.model.text.vocab_size=64", "--steps=2", "--warmup=1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    figures = json.loads(lines[-1])
    assert "step_time_s" in lines[0] or any(l.startswith("step_time_s") for l in lines)
    for key in ("step_time_s", "step_time_min_s", "examples_per_s", "compile_s",
                "flops_per_step", "tflops_per_s", "mfu", "peak_memory_bytes"):
      assert figures[key] is not None and figures[key] > 0, key
    assert figures["step_time_min_s"] <= figures["step_time_s"]
    assert (figures["devices"], figures["platform"]) == (2, "cpu")
    assert figures["peak_flops_source"] == "measured float32 GEMM" and figures["mfu"] < 1
    assert figures["loss_finite"] and figures["config_task"] == "mama_retrieval"


def test_input_only_measures_the_pipeline_per_frame_count():
  from configs import alpro_pretrain
  from vlp_jax.data import input_benchmark
  figures = input_benchmark.run(alpro_pretrain.get_config("tiny"), frames=(2, 4), image_size=32,
                                num_clips=8, batch_size=4, batches=2, warmup=1)
  assert set(figures["input_clips_per_s"]) == {2, 4}
  for t in (2, 4):
    rate = figures["input_clips_per_s"][t]
    assert rate > 0 and figures["input_clips_per_s_per_core"][t] == rate / figures["cores"]
