"""Fine-tuning end to end on the tiny presets: retrieval (VTC + VTM, re-ranked evaluation),
zero-shot evaluation of another run's weights, and video QA from a checkpoint."""
import json
import os

import numpy as np
import pytest

from configs import alpro_qa, alpro_retrieval
from vlp_jax.core import trainer as trainer_lib
from vlp_jax.core.metrics import MetricWriter, read_metrics


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """The tiny synthetic corpus (with questions), shared by both configs."""
  from vlp_jax.data import synthetic
  path = tmp_path_factory.mktemp("data")
  c = alpro_retrieval.get_config("tiny")
  assert c.data.synthetic.to_dict() == alpro_qa.get_config("tiny").data.synthetic.to_dict()
  synthetic.ensure(str(path), c.data.synthetic)
  return str(path)


@pytest.fixture(scope="module")
def retrieval_run(tmp_path_factory, data_dir):
  c = alpro_retrieval.get_config("tiny")
  c.data.dir = data_dir
  workdir = str(tmp_path_factory.mktemp("ret"))
  return workdir, trainer_lib.train(c, workdir)


def _rows(workdir, split):
  return [r for r in read_metrics(workdir) if r["split"] == split]


def test_retrieval_finetune_logs_reranked_and_vtc_metrics(retrieval_run):
  workdir, results = retrieval_run
  train = _rows(workdir, "train")
  assert [r["step"] for r in train] == [3, 6]
  assert all(np.isfinite(r["loss/vtc"]) and np.isfinite(r["loss/vtm"]) for r in train)
  assert not any("loss/mlm" in r for r in train)  # fine-tuning: VTC + VTM only
  (test,) = _rows(workdir, "test")
  for prefix in ("retrieval", "retrieval_vtc"):
    for d in ("t2v", "v2t"):
      assert 0.0 <= test[f"{prefix}/{d}_R@1"] <= test[f"{prefix}/{d}_R@5"] <= 100.0
      assert test[f"{prefix}/{d}_MnR"] >= 1.0
  assert results["test"]["retrieval/t2v_R@10"] == test["retrieval/t2v_R@10"]


def test_zero_shot_evaluation_of_another_runs_weights(tmp_path, retrieval_run, data_dir):
  """A fresh workdir with `init.checkpoint` evaluates that run's weights: same numbers."""
  source, results = retrieval_run
  c = alpro_retrieval.get_config(f"tiny,init.checkpoint={source}")
  c.data.dir = data_dir
  run = trainer_lib.Trainer(c, str(tmp_path)).build()
  assert run.restore() is None
  run.apply_init()
  got = run.evaluate(0, MetricWriter(str(tmp_path), tensorboard=False))["test"]
  for k, v in results["test"].items():
    if k.startswith("retrieval"):
      assert got[k] == pytest.approx(v, abs=1e-6), k


def test_qa_finetune_from_checkpoint_logs_accuracy(tmp_path, retrieval_run, data_dir):
  """QA from the retrieval run's weights (the QA head, absent there, keeps its fresh init)."""
  source, _ = retrieval_run
  c = alpro_qa.get_config(f"tiny,init.checkpoint={source}")
  c.data.dir = data_dir
  results = trainer_lib.train(c, str(tmp_path / "qa"))
  train = _rows(tmp_path / "qa", "train")
  assert [r["step"] for r in train] == [3, 6]
  assert all(np.isfinite(r["loss/qa"]) for r in train)
  (test,) = _rows(tmp_path / "qa", "test")
  assert 0.0 <= test["qa/accuracy"] <= 100.0 - test["qa/oov"]
  assert test["qa/oov"] > 0.0  # 8 answers: some test answers are out of vocabulary
  assert results["test"]["qa/accuracy"] == test["qa/accuracy"]
  saved = json.load(open(os.path.join(tmp_path / "qa", "answers.json")))
  assert len(saved["answers"]) == c.model.num_answers == 8


def test_paper_presets():
  from vlp_jax.models.alpro import alpro_config
  ret, didemo = alpro_retrieval.get_config("msrvtt"), alpro_retrieval.get_config("didemo")
  assert alpro_retrieval.get_config("base").to_dict() == dict(ret.to_dict(), preset="base")
  assert (ret.data.num_frames, ret.optim.model.lr, ret.batch_size) == (8, 2.5e-5, 64)
  assert ret.num_steps == -(-5 * 180_000 // 64)  # 5 epochs over MSRVTT-9k's caption pairs
  assert (didemo.data.num_frames, didemo.optim.model.lr, didemo.batch_size) == (8, 4e-5, 96)
  assert didemo.num_steps == -(-10 * 8_395 // 96)
  qa, msvd = alpro_qa.get_config("msrvtt_qa"), alpro_qa.get_config("msvd_qa")
  assert (qa.data.num_frames, qa.model.remat, qa.optim.model.lr, qa.model.num_answers) == (
      16, "full", 5e-5, 1500)
  assert qa.batch_size == 192 and qa.optim.grad_accum == 2
  assert msvd.model.num_answers == 2423 and msvd.num_steps == -(-15 * 30_933 // 192)
  for c in (ret, didemo, qa, msvd):
    assert not c.data.synthetic.generate and c.data.image_ratio == 0.0 and c.loss.mlm == 0.0
    assert c.model.video.num_frames == 4  # the pre-training's time embedding, interpolated
    alpro_config(c.model, 30522)  # a valid model at bert-base vocabulary size
  for c in (ret, didemo):
    assert c.evals.test.rerank_k > 0 and c.evals.test.type == "retrieval"
    assert c.task == "alpro"


def _decoded_not_blank(path):
  from PIL import Image
  with Image.open(path) as im:
    pixels = np.asarray(im.convert("RGB"))
  return pixels.shape[0] > 50 and pixels.shape[1] > 50 and len(np.unique(
      pixels.reshape(-1, 3), axis=0)) > 10


def test_report_writes_figures_that_decode_and_are_not_blank(tmp_path, retrieval_run, data_dir):
  """`launch.report` on the retrieval run and on a QA run: curves, heat-map, ranks, confusion."""
  import subprocess
  import sys
  workdir, _ = retrieval_run
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-m", "launch.report", f"--workdir={workdir}",
                         f"--out={tmp_path / 'ret'}"], cwd=root, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  names = sorted(os.listdir(tmp_path / "ret"))
  assert names == ["eval_test.png", "test_ranks.png", "test_similarity.png", "train.png"]
  for n in names:
    assert _decoded_not_blank(tmp_path / "ret" / n), n
  from vlp_jax.eval import report
  qa = alpro_qa.get_config("tiny")
  qa.data.dir = data_dir
  trainer_lib.train(qa, str(tmp_path / "qa"))
  paths = report.write_report(str(tmp_path / "qa"))
  assert sorted(os.path.basename(p) for p in paths) == [
      "eval_test.png", "test_confusion.png", "train.png"]
  assert all(_decoded_not_blank(p) for p in paths)
  with np.load(tmp_path / "qa" / "eval" / "test" / "step_6.npz") as arrays:
    assert arrays["confusion"].shape == (8, 8) and list(arrays["labels"])[:1]
  with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
    report.write_report(str(tmp_path / "nothing"))
