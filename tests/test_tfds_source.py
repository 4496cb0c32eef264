"""`data.source = "tfds"`: training and evaluation read a prepared TFDS video dataset (PNG frames,
class names as captions) through the config's feature mapping."""
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import alpro_pretrain
from vlp_jax.core import trainer as trainer_lib
from vlp_jax.data import tokenizer

NAMES = ["circle moving left", "square moving right"]



def _devices():
  """4 of the 8 test devices: a batch of 4."""
  import jax
  return jax.devices()[:4]


class TinyVideos(tfds.core.GeneratorBasedBuilder):
  """4 training and 4 test clips of 5 PNG frames, labels with class names."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "video": tfds.features.Video(shape=(None, 24, 32, 3)),
        "label": tfds.features.ClassLabel(names=NAMES)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(0), "test": self._generate_examples(1)}

  def _generate_examples(self, seed):
    rng = np.random.default_rng(seed)
    for i in range(4):
      video = rng.integers(0, 255, (5, 24, 32, 3), dtype=np.uint8)
      yield f"clip{seed}_{i}", {"video": video, "label": i % 2}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds")
  builder = TinyVideos(data_dir=str(root))
  builder.download_and_prepare()
  vocab = str(root / "vocab.txt")
  tokenizer.write_vocab(vocab, " ".join(NAMES).split())
  return builder.data_dir, vocab


def _config(prepared, **mapping):
  c = alpro_pretrain.get_config("tiny")
  c.data.source = "tfds"
  c.data.tfds.update(dir=prepared[0], **mapping)
  c.data.vocab = prepared[1]
  c.data.image_ratio = 0.0
  c.loss.pem = 0.0
  c.batch_size = c.eval_batch_size = 4
  c.mesh.update(data=4)
  c.update_from_flattened_dict({"num_steps": 3, "log_every": 1})
  c.evals = ml_collections.ConfigDict({"test": alpro_pretrain.retrieval_eval("test")})
  return c


def test_training_and_evaluation_read_a_prepared_tfds_dataset(tmp_path, prepared):
  c = _config(prepared)
  devices = _devices()
  run = trainer_lib.Trainer(c, str(tmp_path / "peek"), devices).build()
  batch = next(run.loaders()["train"])
  assert batch["video"].shape == (4, 2, 32, 32, 3) and np.isfinite(batch["video"]).all()
  texts = {run.text.tokenizer.decode(ids, skip_special_tokens=True)
           for ids in batch["text_ids"]}
  assert texts <= set(NAMES) and batch["valid"].all()
  run.checkpointer.close()

  results = trainer_lib.train(c, str(tmp_path / "run"), devices=devices)
  assert np.isfinite(results["train"]["loss"]) and results["train"]["data/skipped_clips"] == 0
  assert results["test"]["eval/num_clips"] == 4  # TFDS's split size: the count contract holds
  assert 0.0 <= results["test"]["retrieval/t2v_R@1"] <= 100.0


def test_bad_mapping_and_split_are_clear_errors(tmp_path, prepared):
  with pytest.raises(ValueError, match=r"data.tfds.video='frames' is not a feature"):
    trainer_lib.train(_config(prepared, video="frames"), str(tmp_path / "a"), devices=_devices())
  c = _config(prepared)
  c.evals.test.split = "validation"
  with pytest.raises(ValueError, match="has no split 'validation'"):
    trainer_lib.train(c, str(tmp_path / "b"), devices=_devices())
  c = _config(prepared)
  c.data.vocab = ""
  with pytest.raises(ValueError, match="needs data.vocab"):
    trainer_lib.train(c, str(tmp_path / "c"), devices=_devices())
