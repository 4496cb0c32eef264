"""launch/tpu_pod.sh and launch/slurm_gpu.sbatch: dry runs print the commands they would run
(nothing reaches gcloud or SLURM), argument errors exit 2, and the config keys and XLA flags
the scripts name exist."""
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join("launch", "tpu_pod.sh")
SLURM = os.path.join("launch", "slurm_gpu.sbatch")
SCRIPTS = (TPU, SLURM)
POD = ["--name=vlp-v4", "--zone=us-central2-b", "--accelerator=v4-32"]
# Training arguments that must reach every worker unchanged: a space and a quote.
TRAIN = ["--config=configs/alpro_pretrain.py:base", "--workdir=/mnt/shared/runs/my run",
         "--config.data.vocab=/mnt/o'brien/vocab.txt"]


@pytest.fixture(scope="module")
def stub_path(tmp_path_factory):
  """PATH with failing `gcloud` and `srun` first: a dry run that calls either one fails."""
  bin_dir = tmp_path_factory.mktemp("bin")
  for name in ("gcloud", "srun", "sbatch"):
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\necho '{name} called in a dry run' >&2\nexit 97\n")
    path.chmod(0o755)
  return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


@pytest.fixture(autouse=True)
def _stubs(stub_path, monkeypatch):
  monkeypatch.setenv("PATH", stub_path)


def _bash(*args, env=None):
  full_env = dict(os.environ, **(env or {}))
  return subprocess.run(["bash", *args], cwd=ROOT, capture_output=True, text=True, env=full_env,
                        timeout=30)


def _commands(stdout):
  """The `+ ` lines of a dry run, each split into words as a shell would."""
  return [shlex.split(l[2:]) for l in stdout.splitlines() if l.startswith("+ ")]


def _remote(words):
  """The shell command an `ssh ... --command=CMD` runs on the workers, split into words."""
  (command,) = [w.split("=", 1)[1] for w in words if w.startswith("--command=")]
  return shlex.split(command)


def _tpu_dry_run(*extra):
  r = _bash(TPU, "--dry-run", *POD, *extra, "--", *TRAIN)
  assert r.returncode == 0, r.stderr
  cmds = _commands(r.stdout)
  assert cmds and all(c[:3] == ["gcloud", "compute", "tpus"] for c in cmds), r.stdout
  assert len(cmds) == len(r.stdout.splitlines())  # nothing but commands is printed
  return cmds


def test_scripts_are_executable_and_parse():
  for script in SCRIPTS:
    assert os.access(os.path.join(ROOT, script), os.X_OK), script
    r = _bash("-n", script)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck():
  r = subprocess.run(["shellcheck", "--shell=bash", *SCRIPTS], cwd=ROOT, capture_output=True,
                     text=True, timeout=60)
  assert r.returncode == 0, r.stdout


def test_tpu_pod_dry_run_repo():
  cmds = _tpu_dry_run("--repo=https://example.com/vlp_jax.git", "--ref=v1", "--project=p1",
                      "--spot")
  assert [c[3] for c in cmds] == ["tpu-vm"] * 4
  create, clone, install, train = cmds
  assert create[4:6] == ["create", "vlp-v4"]
  for flag in ("--zone=us-central2-b", "--accelerator-type=v4-32",
               "--version=tpu-ubuntu2204-base", "--spot", "--project=p1"):
    assert flag in create
  for c in (clone, install, train):
    assert c[4:6] == ["ssh", "vlp-v4"]
    for flag in ("--worker=all", "--zone=us-central2-b", "--project=p1"):
      assert flag in c
  clone = " ".join(_remote(clone))
  assert "git clone -q https://example.com/vlp_jax.git vlp_jax" in clone
  assert "git checkout -q --detach v1" in clone
  install = " ".join(_remote(install))
  assert "-m venv .venv" in install and ". .venv/bin/activate" in install
  assert "pip install -q -r requirements.txt && pip install -q jax[tpu]" in install
  train = _remote(train)
  i = train.index("python")
  assert train[:i] == ["cd", "vlp_jax", "&&", ".", ".venv/bin/activate", "&&"]
  assert train[i:] == ["python", "-m", "launch.train", "--distributed", *TRAIN]


def test_tpu_pod_dry_run_copy():
  cmds = _tpu_dry_run("--copy", "--dir=code")
  assert "--spot" not in cmds[0] and not any(w.startswith("--project") for w in cmds[0])
  (scp,) = [c for c in cmds if c[4] == "scp"]
  assert "--recurse" in scp and "--worker=all" in scp and scp[-3] == "vlp-v4:code"
  sources = {os.path.relpath(w, ROOT) for w in scp if w.startswith(ROOT)}
  assert {"launch", "vlp_jax", "configs", "requirements.txt", "pyproject.toml"} <= sources
  assert ".venv" not in sources and ".git" not in sources
  assert _remote(cmds[-1])[:2] == ["cd", "code"]


@pytest.mark.parametrize("drop", ["--name", "--zone", "--accelerator", "--"])
def test_tpu_pod_usage_errors(drop):
  args = [a for a in POD if not a.startswith(drop + "=")]
  r = _bash(TPU, "--dry-run", "--copy", *args, *([] if drop == "--" else ["--", *TRAIN]))
  assert r.returncode == 2 and r.stdout == ""
  assert (drop.lstrip("-") if drop != "--" else "no training arguments") in r.stderr
  assert "--help" in r.stderr


def test_tpu_pod_help():
  r = _bash(TPU, "--help")
  assert r.returncode == 0 and r.stdout.startswith("Usage: launch/tpu_pod.sh --name=NAME")


def _slurm_dry_run(*args, env=None):
  r = _bash(SLURM, *args, env={"DRY_RUN": "1", **(env or {})})
  assert r.returncode == 0, r.stderr
  (flags,) = [l.split("=", 1)[1] for l in r.stdout.splitlines() if l.startswith("XLA_FLAGS=")]
  (cmd,) = _commands(r.stdout)
  return flags.split(), cmd


def test_slurm_dry_run():
  flags, cmd = _slurm_dry_run(*TRAIN, env={"XLA_FLAGS": "--xla_dump_to=/tmp/hlo"})
  assert cmd[0] == "srun"
  i = cmd.index("python")
  assert cmd[i:] == ["python", "-m", "launch.train", "--distributed", *TRAIN]
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
  assert flags[-1] == "--xla_dump_to=/tmp/hlo"  # the caller's flags come last and win


def test_slurm_xla_flags_are_known_to_xla():
  """XLA aborts at start on an unknown flag (flags get removed): the installed one must know
  every GPU flag the script sets. A CPU jaxlib parses the GPU flags too."""
  flags, _ = _slurm_dry_run(*TRAIN, env={"XLA_FLAGS": ""})
  env = dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", "import jax; jax.numpy.zeros(1).block_until_ready()"],
                     env=env, capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stderr[-2000:]


def test_slurm_help_and_usage():
  r = _bash(SLURM, "--help")
  assert r.returncode == 0 and "launch/slurm_gpu.sbatch" in r.stdout.splitlines()[0]
  r = _bash(SLURM)
  assert r.returncode == 2 and r.stderr.startswith("Usage:")


def test_config_keys_in_examples_exist():
  """Every `--config.a.b=` the scripts show (help and examples) names a key of the config."""
  from configs import alpro_pretrain
  config = alpro_pretrain.get_config("base")
  keys = set()
  for script in SCRIPTS:
    with open(os.path.join(ROOT, script)) as f:
      keys |= set(re.findall(r"--config\.([\w.]+)=", f.read()))
  assert {"mesh.data", "mesh.fsdp", "data.dir"} <= keys
  for key in sorted(keys):
    node = config
    for part in key.split("."):
      assert part in node, f"--config.{key} in the scripts is not a config key"
      node = node[part]
