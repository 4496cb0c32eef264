"""Config presets, inline overrides and their error messages; mesh shape resolution."""
import subprocess
import sys

import numpy as np
import pytest

from configs import alpro_pretrain
from vlp_jax import config as config_lib
from vlp_jax.parallel import mesh as mesh_lib


def test_presets_differ_and_record_their_name():
  tiny, demo, base = (alpro_pretrain.get_config(p) for p in ("tiny", "demo", "base"))
  assert (tiny.preset, demo.preset, base.preset) == ("tiny", "demo", "base")
  assert base.model.video.hidden == 768 and base.model.text.layers == 12
  assert base.model.text.fusion_layer == 6 and base.model.video.patch_size == 16
  assert tiny.model.video.hidden < demo.model.video.hidden < base.model.video.hidden
  assert tiny.data.synthetic.generate and demo.data.synthetic.generate


def test_inline_overrides_keep_types():
  c = alpro_pretrain.get_config("tiny,optim.model.lr=3e-4,num_steps=7,data.flip=true,"
                                "model.video.temporal=none")
  assert c.optim.model.lr == pytest.approx(3e-4) and isinstance(c.optim.model.lr, float)
  assert c.num_steps == 7 and c.data.flip is True and c.model.video.temporal == "none"
  c = alpro_pretrain.get_config("tiny,optim.model.lr=1")  # an int literal for a float field
  assert isinstance(c.optim.model.lr, float) and c.optim.model.lr == 1.0


@pytest.mark.parametrize("arg,needle", [
    ("huge", "unknown preset 'huge'"),
    ("tiny,optim.model.lrr=1", "unknown config key 'optim.model.lrr'"),
    ("tiny,nothere.lr=1", "unknown config key 'nothere'"),
    ("tiny,num_steps=abc", "config key 'num_steps' expects int"),
    ("tiny,num_steps=1.5", "config key 'num_steps' expects int"),
    ("tiny,data.flip=maybe", "config key 'data.flip' expects a bool"),
    ("tiny,lonely", "is not of the form key=value"),
])
def test_bad_config_args_name_the_problem(arg, needle):
  with pytest.raises(config_lib.ConfigError, match=needle.replace("(", r"\(")):
    alpro_pretrain.get_config(arg)


def _train_cli(tmp_path, *args):
  return subprocess.run([sys.executable, "-m", "launch.train", f"--workdir={tmp_path}", *args],
                        capture_output=True, text=True, timeout=120,
                        cwd=config_lib.__file__.rsplit("/vlp_jax/", 1)[0])


def test_cli_rejects_unknown_preset_and_key(tmp_path):
  r = _train_cli(tmp_path, "--config=configs/alpro_pretrain.py:nope")
  assert r.returncode != 0 and "unknown preset 'nope'" in r.stderr
  r = _train_cli(tmp_path, "--config=configs/alpro_pretrain.py:tiny", "--config.optim.nope=1")
  assert r.returncode != 0 and "nope" in r.stderr
  r = _train_cli(tmp_path, "--config=configs/alpro_pretrain.py:tiny", "--config.num_steps=abc")
  assert r.returncode != 0 and "num_steps" in r.stderr


@pytest.mark.parametrize("cfg,n,expected", [
    ({"data": -1, "fsdp": 1, "tensor": 1}, 8, (8, 1, 1)),
    ({"data": 2, "fsdp": 2, "tensor": 2}, 8, (2, 2, 2)),
    ({"data": 2, "fsdp": -1, "tensor": 1}, 8, (2, 4, 1)),
])
def test_mesh_shape(cfg, n, expected):
  assert mesh_lib.mesh_shape(cfg, n) == expected


@pytest.mark.parametrize("cfg,needle", [
    ({"data": -1, "fsdp": -1, "tensor": 1}, "only one axis"),
    ({"data": 3, "fsdp": -1, "tensor": 1}, "not divisible"),
    ({"data": 2, "fsdp": 2, "tensor": 1}, "needs 4 devices"),
    ({"data": 0, "fsdp": 1, "tensor": 1}, "mesh.data"),
])
def test_mesh_shape_errors(cfg, needle):
  with pytest.raises(ValueError, match=needle):
    mesh_lib.mesh_shape(cfg, 8)


class _FakeDevice:
  """What the hybrid mesh reads of a device: a host (process) or a TPU slice."""

  def __init__(self, i, process_index, slice_index=None):
    self.id, self.process_index, self.platform, self.device_kind = i, process_index, "gpu", "fake"
    if slice_index is not None:
      self.slice_index = slice_index

  def __repr__(self):
    return f"d{self.id}"


def test_hybrid_mesh_keeps_ici_axes_inside_a_host_and_spans_hosts_with_dcn():
  # 2 hosts x 4 devices; data=4 of which 2 across hosts (DCN), fsdp=2 inside each host.
  devices = [_FakeDevice(i, i // 4) for i in range(8)]
  cfg = {"data": 4, "fsdp": 2, "tensor": 1, "dcn": {"data": 2}}
  array = mesh_lib.device_array(cfg, devices)
  assert array.shape == (4, 2, 1)
  hosts = np.vectorize(lambda d: d.process_index)(array)[:, :, 0]
  # fsdp groups (a row) never leave a host; the data axis crosses hosts in its DCN part.
  assert all(len(set(row)) == 1 for row in hosts)
  assert sorted(set(hosts[:, 0])) == [0, 1]
  # TPU multi-slice: slices (not processes) are the DCN groups.
  sliced = [_FakeDevice(i, 0, slice_index=i // 4) for i in range(8)]
  slices = np.vectorize(lambda d: d.slice_index)(mesh_lib.device_array(cfg, sliced))[:, :, 0]
  assert all(len(set(row)) == 1 for row in slices)
  with pytest.raises(ValueError, match=r"mesh.dcn.fsdp=3 must be >= 1 and divide mesh.fsdp=2"):
    mesh_lib.device_array(dict(cfg, dcn={"fsdp": 3}), devices)
  # One process per GPU (8 processes on 2 hosts): consecutive processes form the 2 groups.
  per_gpu = [_FakeDevice(i, i) for i in range(8)]
  procs = np.vectorize(lambda d: d.process_index // 4)(
      mesh_lib.device_array(cfg, per_gpu))[:, :, 0]
  assert all(len(set(row)) == 1 for row in procs)
  with pytest.raises(ValueError, match="2 processes cannot form 4 DCN groups"):
    mesh_lib.device_array(dict(cfg, dcn={"data": 4}), devices)  # 2 hosts, not 4
  plain = mesh_lib.device_array({"data": -1}, devices)
  assert plain.shape == (8, 1, 1)
