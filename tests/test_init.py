"""`config.init.checkpoint` and `load_run_params`: params from another run's checkpoint."""
import jax
import numpy as np
import pytest
from flax import traverse_util

from configs import alpro_pretrain
from vlp_jax.core import init as init_lib
from vlp_jax.core.trainer import Trainer


def _config(**model_text):
  c = alpro_pretrain.get_config("tiny")
  c.data.source = "random"
  c.model.text.vocab_size = 64
  c.model.text.update(model_text)
  c.mesh.update(data=2, fsdp=2, tensor=1)
  return c


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """A run with one checkpoint (step 3) of its fresh seed-0 params."""
  workdir = str(tmp_path_factory.mktemp("source"))
  run = Trainer(_config(), workdir, devices=jax.devices()[:4]).build()
  run.checkpointer.save(3, run.state)
  run.checkpointer.close()
  return workdir, run


def test_init_checkpoint_copies_matching_params_and_keeps_new_ones(tmp_path, source):
  workdir, src = source
  c = _config(layers=3)  # one more fusion layer than the source has
  c.seed = 1
  c.init.checkpoint = workdir
  run = Trainer(c, str(tmp_path), devices=jax.devices()[:4]).build()
  fresh = traverse_util.flatten_dict(jax.device_get(run.state.params))
  run.apply_init()
  got = traverse_util.flatten_dict(jax.device_get(run.state.params))
  want = traverse_util.flatten_dict(jax.device_get(src.state.params))
  new = [k for k in got if k not in want]
  assert new and all("layer_2" in k for k in new)
  for k, v in got.items():
    ref = want[k] if k in want else fresh[k]
    np.testing.assert_array_equal(v, ref, err_msg="/".join(k))
  # Different seeds: the copy really changed something.
  assert any(not np.array_equal(fresh[k], want[k]) for k in want)
  # The copied params keep the run's sharding.
  for a, b in zip(jax.tree.leaves(run.state.params), jax.tree.leaves(run.shardings.params)):
    assert a.sharding == b


def test_load_run_params_restores_sharded(source):
  workdir, src = source
  params, shardings = init_lib.load_run_params(workdir, src.task.init_params, src.mesh,
                                               src.rules)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(src.state.params["model"])):
    np.testing.assert_array_equal(jax.device_get(a), jax.device_get(b))
  for a, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
    assert a.sharding == s


def test_init_errors_name_the_problem(tmp_path, source):
  workdir, _ = source
  c = _config(hidden=48, heads=2)
  c.model.video.hidden = 48
  c.init.checkpoint = workdir
  run = Trainer(c, str(tmp_path / "wide"), devices=jax.devices()[:4]).build()
  with pytest.raises(ValueError, match=r"has shape \(32,\) .* but \(48,\)"):
    run.apply_init()
  with pytest.raises(FileNotFoundError, match="no run directory"):
    init_lib.checkpoint_param_shapes(str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="no checkpoint at step 7"):
    init_lib.checkpoint_param_shapes(workdir, 7)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
    init_lib.checkpoint_param_shapes(str(tmp_path / "empty"))
