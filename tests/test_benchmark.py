"""launch.benchmark: the figures of a step, as a table and a last-line JSON object."""
import json
import os
import subprocess
import sys

import pytest

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


def test_torch_reference_has_our_vtc_shapes_and_trains():
  """--compare=torch: the PyTorch reference holds exactly the parameters of our VTC path
  (video encoder, text encoder up to fusion_layer, projections, temperature) and steps."""
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  import jax
  import numpy as np

  from configs import alpro_pretrain
  from vlp_jax.core import benchmark, torch_reference
  from vlp_jax.models.alpro import ALPRO, alpro_config

  config = alpro_pretrain.get_config("tiny")
  with config.unlocked():
    config.model.text.vocab_size = 64
  config = benchmark.vtc_only(config)
  assert all(config.loss[k] == 0 for k in ("vtm", "mlm", "pem")) and config.loss.vtc == 1
  assert config.data.image_ratio == 0

  model = ALPRO(alpro_config(config.model, 64))
  d = config.data
  shapes = jax.eval_shape(lambda r: model.init(
      {"params": r, "dropout": r}, np.zeros((2, d.num_frames, d.image_size, d.image_size, 3),
                                             np.float32),
      np.zeros((2, d.max_text_len), np.int32), np.ones((2, d.max_text_len), np.int32)),
      jax.random.PRNGKey(0))["params"]
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  ours = (count(shapes["video_encoder"]) + count(shapes["text_encoder"])
          + count(shapes["vision_proj"]) + count(shapes["text_proj"]) + 1)
  ref = torch_reference.build(config)
  theirs = sum(p.numel() for k in ("video", "text", "vision_proj", "text_proj")
               for p in ref[k].parameters()) + ref["temp"].numel()
  assert theirs == ours

  figures = torch_reference.run(config, steps=2, warmup=1)
  assert figures["torch_loss_finite"] and figures["torch_step_time_s"] > 0
  assert figures["torch_step_time_min_s"] <= figures["torch_step_time_s"]


def test_gemm_comparison_shape_and_both_libraries():
  """--compare=torch also times the video MLP's GEMM (its shape read from the config) in both
  libraries: tokens = batch x (1 + frames x patches)."""
  pytest.importorskip("torch")
  from configs import alpro_pretrain
  from vlp_jax.core import benchmark, torch_reference
  assert benchmark.mlp_gemm_shape(alpro_pretrain.get_config("bench")) == (
      16 * (1 + 4 * 7 * 7), 384, 1536)
  config = alpro_pretrain.get_config("tiny")
  v = config.model.video
  assert benchmark.mlp_gemm_shape(config) == (
      config.batch_size * (1 + config.data.num_frames * (v.image_size // v.patch_size) ** 2),
      v.hidden, v.mlp_dim)
  ours, theirs = benchmark.gemm_flops((64, 32, 48)), torch_reference.gemm_flops((64, 32, 48))
  assert set(ours) == set(theirs) == {"forward", "weight_grad"}
  assert all(f > 0 for f in (*ours.values(), *theirs.values()))


def test_compare_torch_needs_alpro():
  from configs import mama_qa
  from vlp_jax.core import benchmark
  with pytest.raises(ValueError, match="ALPRO's VTC step"):
    benchmark.vtc_only(mama_qa.get_config("tiny"))


@pytest.mark.parametrize("losses,num_devices", [(("vtc",), 8), (("vtc", "vtm", "mlm", "pem"), 1)])
def test_analytic_flops_match_xla_cost_analysis(losses, num_devices):
  """methods/alpro/flops.py counts the matmuls of the step XLA compiles: the same FLOPs
  within the element-wise work XLA adds (softmax, GELU, LayerNorm, AdamW). On 8 devices the
  partitioned program does an eighth of the work; the reported figure is the global one."""
  from configs import alpro_pretrain
  from vlp_jax.core import benchmark
  config = alpro_pretrain.get_config("tiny")
  with config.unlocked():
    config.data.update(num_frames=4, image_size=32, max_text_len=16)
    config.model.video.update(num_frames=4, image_size=32, patch_size=8, hidden=96, heads=4,
                              mlp_dim=384)
    config.model.text.update(vocab_size=512, hidden=96, heads=4, mlp_dim=384, layers=3,
                             fusion_layer=2)
    config.batch_size = 8
    for k in config.loss:
      config.loss[k] = 1.0 if k in losses else 0.0
  import jax
  figures = benchmark.run(config, steps=1, warmup=0, devices=jax.devices()[:num_devices])
  assert figures["devices"] == num_devices
  ratio = figures["flops_analytic_over_xla"]
  assert figures["flops_per_step_analytic"] > 0 and 0.8 < ratio <= 1.0, ratio
