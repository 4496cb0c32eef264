"""The CLIP feature cache: `launch.extract_features` against live features, every clip and
frame present, resume, mismatch refusal, corrupt input, and 8-device sharding."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from configs import alpro_pretrain  # noqa: E402
from helpers import perturb  # noqa: E402
from launch import extract_features  # noqa: E402
from vlp_jax.convert import clip as convert_clip  # noqa: E402
from vlp_jax.data import feature_cache, pipeline, records, synthetic, tokenizer  # noqa: E402

IMAGE, FRAMES, SOURCE_SIZE, DIM = 32, 3, 40, 16
SPLITS = ("val", "images")
COUNTS = {"val": 6, "images": 3}
FRAMES_PER_CLIP = {"val": FRAMES, "images": 1}


def _save_clip(path: str, seed: int) -> str:
  """A tiny random CLIPModel (image 32 px, patch 16, width 32) saved with save_pretrained."""
  torch.manual_seed(seed)
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=37, max_position_embeddings=16,
                       eos_token_id=63, bos_token_id=62, pad_token_id=0),
      vision_config=dict(image_size=IMAGE, patch_size=16, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=37),
      projection_dim=DIM)
  perturb(transformers.CLIPModel(config)).save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("feature_cache")
  data = str(root / "data")
  synthetic.generate(data, seed=5, num_train=2, num_val=COUNTS["val"], num_test=2,
                     num_test_unseen=2, num_frames=FRAMES, image_size=SOURCE_SIZE, num_shards=2,
                     num_images=COUNTS["images"])
  clip_a = _save_clip(str(root / "clip_a"), 0)
  clip_b = _save_clip(str(root / "clip_b"), 1)
  out = str(root / "out_1dev")
  summary = _extract(clip_a, data, out, devices=jax.devices()[:1], batch_size=4)
  return dict(root=root, data=data, clip=clip_a, other_clip=clip_b, out=out, summary=summary)


def _extract(clip, data, out, *, devices=None, batch_size=4, splits=SPLITS):
  return extract_features.extract(f"hf:{clip}", data, splits, out, batch_size=batch_size,
                                  workers=2, chunk_frames=2,
                                  devices=jax.devices()[:1] if devices is None else devices)


def _records(data, split):
  return [records.example_to_dict(r) for f in records.split_files(data, split)
          for r in records.read_records(f)]


def _all(out, split):
  return {c.video_id: c for c in feature_cache.read_split(out, split, mmap=False)}


def _live_features(world, split):
  """video id -> float32 [T, D]: our CLIP on the frames the input pipeline decodes (eval)."""
  module, params = convert_clip.import_clip(world["clip"], image_size=IMAGE)
  tok = tokenizer.load_tokenizer(os.path.join(world["data"], "vocab.txt"))
  cfg = alpro_pretrain.get_config("tiny").data
  cfg.eval_sampling = "uniform"  # with T = the stored count: every frame, in order
  loader = pipeline.Loader(cfg, split, batch_size=4, training=False, seed=0, tokenizer=tok,
                           num_frames=FRAMES_PER_CLIP[split], image_size=IMAGE,
                           data_dir=world["data"])
  encode = jax.jit(lambda p, v: module.apply({"params": p}, v, method="encode_frames"))
  out = {}
  for batch in loader:
    feats = np.asarray(encode(params, batch["video"]))
    for vid, ok, f in zip(batch["video_id"], batch["valid"], feats):
      if ok:
        out[vid.decode()] = f
  return out


def test_cache_equals_live_features_for_every_clip(world):
  assert feature_cache.CLIP_MEAN == pipeline.CLIP_MEAN
  assert feature_cache.CLIP_STD == pipeline.CLIP_STD
  cache = feature_cache.open_cache(world["out"],
                                   expect=feature_cache.describe(world["clip"]))
  for split in SPLITS:
    index = cache.split(split)
    recs = _records(world["data"], split)
    assert sorted(index.video_ids) == sorted(r[records.VIDEO_ID][0].decode() for r in recs)
    assert len(index) == COUNTS[split]
    assert (index.num_frames == FRAMES_PER_CLIP[split]).all()
    live = _live_features(world, split)
    worst = 0.0
    for r in recs:
      clip = index.get(r[records.VIDEO_ID][0].decode())
      assert clip.features.dtype == np.float16
      assert clip.features.shape == (FRAMES_PER_CLIP[split], DIM)
      assert clip.label == r[records.LABEL_INDEX][0]
      assert clip.fps == pytest.approx(synthetic.FPS)
      ref = live[clip.video_id]
      np.testing.assert_allclose(clip.features.astype(np.float32), ref, atol=1e-3, rtol=1e-3)
      worst = max(worst, float(np.abs(clip.features - ref).max()))
    assert worst > 0  # float16 rounding happened: the comparison is not vacuous
  summary = world["summary"]
  assert summary["clips"] == sum(COUNTS.values())
  assert summary["frames"] == sum(COUNTS[s] * FRAMES_PER_CLIP[s] for s in SPLITS)
  assert summary["skipped"] == 0 and summary["shards_written"] == 4
  assert summary["frames_per_s"] > 0


def test_metadata(world):
  meta = feature_cache.read_metadata(world["out"])
  assert meta["checkpoint"]["sha256"] == feature_cache.fingerprint(world["clip"])["sha256"]
  assert meta["checkpoint"]["files"] == ["model.safetensors"]
  assert meta["preprocessing"]["image_size"] == IMAGE
  assert meta["preprocessing"]["channel_order"] == "RGB"
  assert meta["preprocessing"]["mean"] == list(pipeline.CLIP_MEAN)
  assert meta["feature"] == {"kind": "clip_image_embeds_unnormalised", "dim": DIM,
                             "dtype": "float16"}
  assert meta["model"]["patch_size"] == 16 and meta["model"]["hidden"] == 32
  assert meta["source"]["data_dir"] == os.path.abspath(world["data"])
  for split in SPLITS:
    assert meta["source"]["splits"][split]["records"] == COUNTS[split]
    assert meta["source"]["splits"][split]["shards"] == [f"{split}-0000{i}-of-00002"
                                                         for i in range(2)]
    assert meta["results"][split]["clips"] == COUNTS[split]
    assert meta["results"][split]["shards_missing"] == []


def test_rerun_does_no_work_and_another_checkpoint_is_refused(world, monkeypatch):
  files = sorted(os.path.join(d, f) for d, _, fs in os.walk(world["out"]) for f in fs
                 if f.endswith((".npy", ".npz")))
  stamps = {f: os.stat(f).st_mtime_ns for f in files}

  def no_model(*a, **k):
    raise AssertionError("a finished cache must not load the model")

  monkeypatch.setattr(extract_features, "_Encoder", no_model)
  again = _extract(world["clip"], world["data"], world["out"])
  assert (again["clips"], again["frames"], again["shards_written"]) == (0, 0, 0)
  assert again["shards_resumed"] == 4
  assert again["splits"]["val"]["clips"] == COUNTS["val"]
  assert {f: os.stat(f).st_mtime_ns for f in files} == stamps

  with pytest.raises(ValueError, match=r"checkpoint\.sha256: cache '[0-9a-f]{64}', expected"):
    _extract(world["other_clip"], world["data"], world["out"])
  with pytest.raises(ValueError, match=r"checkpoint\.sha256"):
    feature_cache.open_cache(world["out"], expect=feature_cache.describe(world["other_clip"]))
  with pytest.raises(ValueError, match=r"preprocessing\.image_size: cache 32, expected 48"):
    feature_cache.open_cache(world["out"],
                             expect=feature_cache.describe(world["clip"], image_size=48))
  assert {f: os.stat(f).st_mtime_ns for f in files} == stamps


def test_resume_redoes_a_deleted_shard(world, tmp_path):
  out = str(tmp_path / "out")
  shutil.copytree(world["out"], out)
  for path in feature_cache.shard_paths(out, "val", "val-00001-of-00002"):
    os.remove(path)
  with pytest.raises(ValueError, match="lacks 1 of 2 shards"):
    feature_cache.read_split(out, "val")
  summary = _extract(world["clip"], world["data"], out)
  assert (summary["shards_written"], summary["shards_resumed"]) == (1, 3)
  assert summary["clips"] == COUNTS["val"] // 2
  for split in SPLITS:
    a, b = _all(world["out"], split), _all(out, split)
    assert list(a) == list(b)
    for vid in a:
      np.testing.assert_array_equal(a[vid].features, b[vid].features)


def _rewrite(path, serialized):
  with tf.io.TFRecordWriter(path) as w:
    for s in serialized:
      w.write(s)
  records.write_manifest(path, len(serialized))


def test_corrupt_records_and_shards_are_skipped_and_listed(world, tmp_path):
  data, out = str(tmp_path / "data"), str(tmp_path / "out")
  os.makedirs(data)
  for f in records.split_files(world["data"], "val"):
    shutil.copy(f, data)
    shutil.copy(records.manifest_path(f), data)
  first, second = records.split_files(data, "val")
  recs = records.read_records(first)
  ids = [records.example_to_dict(r)[records.VIDEO_ID][0].decode() for r in recs]
  bad_decode = tf.train.SequenceExample.FromString(recs[1])  # a JPEG that does not decode
  bad_decode.feature_lists.feature_list[records.FRAMES].feature[2].bytes_list.value[0] = (
      b"\xff\xd8\xff" + b"\x00" * 64 + b"\xff\xd9")
  bad_frame = tf.train.SequenceExample.FromString(recs[2])  # not a JPEG at all
  bad_frame.feature_lists.feature_list[records.FRAMES].feature[0].bytes_list.value[0] = b"junk"
  _rewrite(first, [recs[0], bad_decode.SerializeToString(), bad_frame.SerializeToString(),
                   b"not a record"])
  with open(second, "r+b") as f:  # the last record loses its tail; the manifest is kept
    f.truncate(os.path.getsize(second) - 10)

  summary = _extract(world["clip"], data, out, splits=("val",))
  assert summary["skipped"] == 4 and summary["clips"] == 3
  assert summary["frames"] == 3 * FRAMES
  result = summary["splits"]["val"]
  assert result["skipped"] == 4 and result["clips"] == 3
  assert result["skipped_by_reason"] == {"undecodable frame": 2, "corrupt record": 1,
                                         "corrupt shard": 1}
  with open(os.path.join(out, feature_cache.SKIPPED)) as f:
    entries = [json.loads(line) for line in f]
  got = [(e["shard"], e["index"], e["id"], e["reason"].split(":")[0]) for e in entries]
  s0, s1 = "val-00000-of-00002", "val-00001-of-00002"
  assert got == [(s0, 1, ids[1], "undecodable frame"), (s0, 2, ids[2], "undecodable frame"),
                 (s0, 3, "", "corrupt record"), (s1, 2, "", "corrupt shard")]
  assert "frame 2" in entries[0]["reason"] and "frame 0" in entries[1]["reason"]
  assert "DataLossError" in entries[3]["reason"]
  kept = _all(out, "val")
  assert ids[0] in kept and ids[1] not in kept and ids[2] not in kept and len(kept) == 3
  reference = _all(world["out"], "val")
  for vid, clip in kept.items():
    np.testing.assert_array_equal(clip.features, reference[vid].features)
  # The corrupt shards were written (what they hold is final): a rerun does no work.
  again = _extract(world["clip"], data, out, splits=("val",))
  assert again["shards_resumed"] == 2 and again["splits"]["val"]["skipped"] == 4


def test_eight_devices_equal_one(world, tmp_path):
  devices = jax.devices()
  assert len(devices) == 8  # tests/conftest.py: 8 simulated CPU devices
  out = str(tmp_path / "out")
  summary = _extract(world["clip"], world["data"], out, devices=devices, batch_size=12)
  assert summary["devices"] == 8 and summary["batch_size"] == 16
  for split in SPLITS:
    a, b = _all(world["out"], split), _all(out, split)
    assert list(a) == list(b)
    for vid in a:
      np.testing.assert_allclose(b[vid].features.astype(np.float32),
                                 a[vid].features.astype(np.float32), atol=1e-3, rtol=1e-3)


def test_command_line(world, tmp_path):
  out = str(tmp_path / "out")
  shutil.copytree(world["out"], out)
  for path in feature_cache.shard_paths(out, "images", "images-00001-of-00002"):
    os.remove(path)
  cmd = [sys.executable, "-m", "launch.extract_features", f"--clip=hf:{world['clip']}",
         f"--data_dir={world['data']}", "--split=val,images", f"--out={out}", "--batch_size=2",
         "--noprogress"]
  run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  summary = json.loads(run.stdout.strip().splitlines()[-1])
  assert (summary["shards_written"], summary["shards_resumed"], summary["clips"]) == (1, 3, 1)
  assert summary["splits"]["images"]["clips"] == COUNTS["images"]
  a, b = _all(world["out"], "images"), _all(out, "images")
  assert list(a) == list(b)
  for vid in a:
    np.testing.assert_allclose(b[vid].features.astype(np.float32),
                               a[vid].features.astype(np.float32), atol=1e-3, rtol=1e-3)
