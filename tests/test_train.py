"""End to end on the `tiny` preset: loss falls, resume is exact, NaN stops, bad input."""
import math
import os

import numpy as np
import pytest

from configs import alpro_pretrain
from helpers import tiny_config, train
from vlp_jax.core import checkpoint as ckpt_lib
from vlp_jax.core import trainer as trainer_lib
from vlp_jax.core.metrics import read_metrics


def _tiny(data_dir, **overrides):
  return tiny_config(data_dir, **overrides)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """One tiny synthetic corpus shared by the tests of this module."""
  from vlp_jax.data import synthetic
  path = tmp_path_factory.mktemp("data")
  synthetic.ensure(str(path), alpro_pretrain.get_config("tiny").data.synthetic)
  return path


def _train_losses(workdir):
  return {r["step"]: r for r in read_metrics(workdir) if r["split"] == "train"}


def test_tiny_trains_loss_falls_and_evaluates(tmp_path, data_dir):
  c = _tiny(data_dir, num_steps=40, log_every=5)
  c.data.dir = ""  # resolved to WORKDIR/data in the run's own copy, never in the caller's config
  c.data.synthetic.generate = True
  before = c.to_dict()
  results = train(c, str(tmp_path))
  assert c.to_dict() == before
  import json
  assert json.load(open(tmp_path / "config.json"))["data"]["dir"] == str(tmp_path / "data")
  rows = _train_losses(tmp_path)
  assert sorted(rows) == list(range(5, 45, 5))
  # ~18 % lower after 40 steps at the tiny preset (measured); MLM learns first at this size.
  assert rows[40]["loss"] < 0.9 * rows[5]["loss"], (rows[5]["loss"], rows[40]["loss"])
  assert rows[40]["loss/mlm"] < 0.9 * rows[5]["loss/mlm"]
  for key in ("loss/vtc", "loss/vtm", "loss/mlm", "grad_norm", "lr", "steps_per_sec"):
    assert math.isfinite(rows[40][key]), key
  # The final evaluation wrote retrieval metrics for the test split.
  test = [r for r in read_metrics(tmp_path) if r["split"] == "test"]
  assert len(test) == 1 and test[0]["step"] == 40
  assert 0.0 <= test[0]["retrieval/t2v_R@1"] <= test[0]["retrieval/t2v_R@10"] <= 100.0
  assert results["test"]["retrieval/v2t_MnR"] >= 1.0
  assert 0.0 <= results["test"]["retrieval/contrast_acc"] <= 100.0
  assert os.path.exists(tmp_path / "config.json")
  assert os.listdir(tmp_path / "tensorboard")


def test_resume_continues_and_matches_uninterrupted(tmp_path, data_dir):
  c = lambda: _tiny(data_dir, num_steps=10, log_every=1, ckpt_every=4, evals={})
  train(c(), str(tmp_path / "a"))
  train(c(), str(tmp_path / "b"), stop_at=6)
  first = _train_losses(tmp_path / "b")
  assert sorted(first) == list(range(1, 7))
  # As if killed after step 6 before its checkpoint was written: resume from step 4, replay 5-6.
  import shutil
  shutil.rmtree(tmp_path / "b" / "checkpoints" / "6")
  assert ckpt_lib.latest_step(str(tmp_path / "b")) == 4
  train(c(), str(tmp_path / "b"))
  a, b = _train_losses(tmp_path / "a"), _train_losses(tmp_path / "b")
  resumed_steps = [r["step"] for r in read_metrics(tmp_path / "b") if r["split"] == "train"]
  assert resumed_steps == list(range(1, 11))  # the replayed rows 5-6 are logged once
  for s in range(1, 11):
    for k in ("loss", "loss/vtc", "loss/vtm", "loss/mlm"):
      assert b[s][k] == pytest.approx(a[s][k], rel=1e-6, abs=1e-7), (s, k)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data_dir):
  train(_tiny(data_dir, num_steps=2, ckpt_every=1, evals={}),
             str(tmp_path))
  bad = _tiny(data_dir, num_steps=5, ckpt_every=1, evals={})
  bad.loss.vtc = float("nan")
  with pytest.raises(trainer_lib.NonFiniteLossError, match="step 3"):
    train(bad, str(tmp_path))
  assert ckpt_lib.latest_step(str(tmp_path)) == 2


def test_missing_data_dir_is_a_clear_error(tmp_path):
  c = _tiny(tmp_path / "nowhere")
  c.data.synthetic.generate = False
  with pytest.raises(FileNotFoundError, match="nowhere"):
    train(c, str(tmp_path / "work"))


def test_corrupt_frame_is_skipped_counted_and_training_continues(tmp_path, data_dir):
  import shutil

  import tensorflow as tf
  corrupt = tmp_path / "data"
  shutil.copytree(data_dir, corrupt)
  shard = sorted(p for p in os.listdir(corrupt) if p.startswith("train-"))[0]
  records = [tf.train.SequenceExample.FromString(r.numpy())
             for r in tf.data.TFRecordDataset(str(corrupt / shard))]
  frames = records[0].feature_lists.feature_list["image/encoded"].feature
  for f in frames:  # every stored frame: whichever indices are sampled, the clip is corrupt
    f.bytes_list.value[0] = f.bytes_list.value[0][: len(f.bytes_list.value[0]) // 2]
  with tf.io.TFRecordWriter(str(corrupt / shard)) as w:
    for r in records:
      w.write(r.SerializeToString())
  c = _tiny(corrupt, num_steps=12, log_every=12, evals={})
  train(c, str(tmp_path / "work"))
  rows = _train_losses(tmp_path / "work")
  assert rows[12]["data/skipped_clips"] >= 1
  assert np.isfinite(rows[12]["loss"])


def _truncate_first_shard(data, split):
  shard = sorted(p for p in os.listdir(data) if p.startswith(f"{split}-") and
                 p.endswith(".tfrecord"))[0]
  path = data / shard
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(size // 2)
  return str(path)


def test_truncated_shards_are_counted_and_evaluation_checks_its_count(tmp_path, data_dir, caplog):
  import shutil

  from configs.alpro_pretrain import retrieval_eval
  corrupt = tmp_path / "data"
  shutil.copytree(data_dir, corrupt)
  train_shard = _truncate_first_shard(corrupt, "train")
  _truncate_first_shard(corrupt, "test")
  c = _tiny(corrupt, num_steps=2, log_every=2, **{"loss.pem": 0.0})
  c.evals = type(c.evals)({"test": retrieval_eval("test")})
  with pytest.raises(trainer_lib.EvalCountError,
                     match=r"split 'test' covered \d+ clips, but 16 were written"):
    train(c, str(tmp_path / "work"))
  # The training shard's lost records were counted and the shard named at start.
  (row,) = _train_losses(tmp_path / "work").values()
  assert row["data/corrupt_records"] >= 1 and row["data/skipped_clips"] == 0
  assert any(train_shard in r.getMessage() and "records lost" in r.getMessage()
             for r in caplog.records)
  # Allowed: the metrics are reported over the readable clips, with their count.
  c.eval.allow_missing = True
  step, results = trainer_lib.evaluate(c, str(tmp_path / "work"))
  assert step == 2 and 0 < results["test"]["eval/num_clips"] < 16
  assert results["test"]["eval/num_queries"] == results["test"]["eval/num_clips"]


def test_failed_checkpoint_write_is_a_clear_error_and_keeps_the_last_good_one(tmp_path,
                                                                               data_dir,
                                                                               monkeypatch):
  from vlp_jax.data import mixture
  c = _tiny(data_dir, num_steps=3, ckpt_every=1, evals={}, **{"loss.pem": 0.0})
  # The disk fills up while step 2 is written (its input position is the first file).
  save, calls = mixture.MixtureLoader.save, []

  def full_disk(self, path):
    calls.append(path)
    if len(calls) == 2:
      raise OSError(28, "No space left on device", path)
    save(self, path)
  monkeypatch.setattr(mixture.MixtureLoader, "save", full_disk)
  with pytest.raises(ckpt_lib.CheckpointWriteError,
                     match=r"checkpoint.*failed.*last good checkpoint \(1\) is kept"):
    train(c, str(tmp_path))
  assert ckpt_lib.latest_step(str(tmp_path)) == 1


def test_wandb_offline_logging_and_resume_of_the_same_run(tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_SILENT", "true")
  c = alpro_pretrain.get_config("tiny")
  c.data.source = "random"
  c.model.text.vocab_size = 64
  c.update_from_flattened_dict({"num_steps": 4, "log_every": 1, "ckpt_every": 2})
  c.wandb.update(enabled=True, mode="offline", project="test")
  trainer_lib.train(c, str(tmp_path), stop_at=2)
  run_id = (tmp_path / "wandb_id.txt").read_text().strip()
  runs = [d for d in os.listdir(tmp_path / "wandb") if d.startswith("offline-run-")]
  assert len(runs) == 1 and runs[0].endswith(run_id)
  logged = os.path.join(tmp_path, "wandb", runs[0], f"run-{run_id}.wandb")
  assert os.path.getsize(logged) > 0
  trainer_lib.train(c, str(tmp_path))  # the resumed run continues the same W&B run id
  assert (tmp_path / "wandb_id.txt").read_text().strip() == run_id
  assert all(d.endswith(run_id) for d in os.listdir(tmp_path / "wandb")
             if d.startswith("offline-run-"))
