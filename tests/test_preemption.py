"""SIGTERM (a preemption notice) mid-run: checkpoint at the next step boundary, exit 0, and a
rerun that continues with the losses of an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 25


def _cmd(workdir):
  return [sys.executable, "-m", "launch.train", "--config=configs/alpro_pretrain.py:tiny",
          "--config.data.source=random", "--config.model.text.vocab_size=64",
          f"--config.num_steps={STEPS}", "--config.log_every=1", "--config.ckpt_every=1000",
          "--config.mesh.data=2", f"--workdir={workdir}"]


def _env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=2 "
                      "--xla_backend_optimization_level=0")
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _rows(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _train_losses(workdir):
  return {r["step"]: r for r in _rows(workdir) if r["split"] == "train"}


def test_sigterm_checkpoints_exits_zero_and_resumes_identically(tmp_path):
  ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
  ref = subprocess.run(_cmd(ref_dir), env=_env(), cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
  assert ref.returncode == 0, ref.stderr[-3000:]

  proc = subprocess.Popen(_cmd(run_dir), env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not _train_losses(run_dir) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  stopped = max(_train_losses(run_dir))
  assert stopped < STEPS, "the run finished before the signal; nothing was tested"
  assert f"stopped after step {stopped} with a checkpoint" in out
  assert os.path.isdir(os.path.join(run_dir, "checkpoints", str(stopped)))

  again = subprocess.run(_cmd(run_dir), env=_env(), cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resumed from" in again.stderr and f"at step {stopped}" in again.stderr
  a, b = _train_losses(ref_dir), _train_losses(run_dir)
  assert [r["step"] for r in _rows(run_dir) if r["split"] == "train"] == list(
      range(1, STEPS + 1))  # one row per step
  for s in range(1, STEPS + 1):
    for k in ("loss", "loss/vtc", "loss/vtm", "loss/mlm", "loss/pem"):
      assert b[s][k] == pytest.approx(a[s][k], rel=1e-6, abs=1e-7), (s, k)
