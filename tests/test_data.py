"""Record schema, frame sampling, MLM masking, the tf.data Loader and the random source."""
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from configs import alpro_pretrain
from vlp_jax.data import pipeline, random_source, records, synthetic, text, tokenizer

T, SIZE, LEN = 2, 32, 16


def _jpeg(value, size=16):
  img = np.full((size, size, 3), value, np.uint8)
  img[: size // 2, : size // 2] = 255 - value  # a corner marker, so flips/crops are visible
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="JPEG", quality=95)
  return buf.getvalue()


def _data_cfg(**kw):
  c = alpro_pretrain.get_config("tiny").data
  c.update(dict(shuffle_buffer=16, max_text_len=LEN), **kw)
  return c


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("corpus"))
  synthetic.generate(d, seed=3, num_train=40, num_val=10, num_test=4, num_test_unseen=4,
                     num_frames=4, image_size=SIZE, num_shards=4)
  return d


@pytest.fixture(scope="module")
def tok(corpus):
  return tokenizer.load_tokenizer(os.path.join(corpus, "vocab.txt"))


def _loader(d, tok, split="train", training=True, batch_size=4, seed=0, cfg=None, **kw):
  return pipeline.Loader(cfg or _data_cfg(), split, batch_size=batch_size, training=training,
                         seed=seed, tokenizer=tok, num_frames=T, image_size=SIZE, data_dir=d,
                         **kw)


def _ids_in(d, split):
  return {records.example_to_dict(r)[records.VIDEO_ID][0]
          for f in records.split_files(d, split) for r in records.read_records(f)}


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ----------------------------------------------------------------------------------- records
def test_record_round_trip_and_file_names(tmp_path):
  frames = [_jpeg(v) for v in (10, 90, 200)]
  full = dict(label_index=5, label_text="moving up", questions=["what moves?", "colour?"],
              answers=["circle", "red"], entities=["circle", "dog"], start_us=1_000_000,
              end_us=3_500_000, extra={"x/bytes": [b"{}"], "x/ints": [3, 4], "x/floats": [0.5]})
  exs = [records.clip_example(f"vid{i}", frames[: 1 + i % 3], [f"cap {i}", "second"], 4.0,
                              **(full if i == 0 else {})) for i in range(7)]
  with records.ShardedWriter(str(tmp_path), "train", 3) as w:
    for ex in exs:
      w.write(ex)
  names = sorted(n for n in os.listdir(tmp_path) if n.endswith(".tfrecord"))
  assert names == [f"train-0000{i}-of-00003.tfrecord" for i in range(3)]
  assert records.split_files(str(tmp_path), "train") == [str(tmp_path / n) for n in names]
  # round robin: shard k holds clips k, k+3, ...
  shard0 = [records.example_to_dict(r)[records.VIDEO_ID][0]
            for r in records.read_records(str(tmp_path / names[0]))]
  assert shard0 == [b"vid0", b"vid3", b"vid6"]

  ds = tf.data.TFRecordDataset(records.split_files(str(tmp_path), "train")[:1]).map(
      lambda s: records.parse_clip(
          s, extra={"x/bytes": tf.string, "x/ints": tf.int64, "x/floats": tf.float32}))
  first, second = list(ds.take(2))
  assert first[records.VIDEO_ID].numpy() == b"vid0"
  assert first[records.FPS].numpy() == pytest.approx(4.0)
  assert first[records.NUM_FRAMES].numpy() == 1
  assert list(first[records.CAPTIONS].numpy()) == [b"cap 0", b"second"]
  assert first[records.LABEL_INDEX].numpy() == 5
  assert first[records.LABEL_TEXT].numpy() == b"moving up"
  assert list(first[records.QUESTIONS].numpy()) == [b"what moves?", b"colour?"]
  assert list(first[records.ANSWERS].numpy()) == [b"circle", b"red"]
  assert list(first[records.ENTITIES].numpy()) == [b"circle", b"dog"]
  assert first[records.START].numpy() == 1_000_000 and first[records.END].numpy() == 3_500_000
  assert list(first["x/bytes"].numpy()) == [b"{}"]
  assert list(first["x/ints"].numpy()) == [3, 4]
  assert list(first["x/floats"].numpy()) == [0.5]
  assert list(first[records.FRAMES].numpy()) == frames[:1]
  # optional keys absent: defaults
  assert second[records.VIDEO_ID].numpy() == b"vid3" and second[records.NUM_FRAMES].numpy() == 1
  assert second[records.LABEL_INDEX].numpy() == -1 and second[records.LABEL_TEXT].numpy() == b""
  assert second[records.QUESTIONS].shape == (0,) and second[records.START].numpy() == -1
  # the proto-level reader agrees
  d = records.example_to_dict(exs[2].SerializeToString())
  assert d[records.FRAMES] == frames and d[records.NUM_FRAMES] == [3]
  assert records.CONTEXT_KEYS == (
      "video/id", "video/fps", "video/num_frames", "caption/string", "clip/label/index",
      "clip/label/text", "question/string", "answer/string", "entity/string",
      "clip/start/timestamp", "clip/end/timestamp", "caption/contrast")



def test_shard_manifests_find_truncated_and_unreadable_shards(tmp_path):
  frames = [_jpeg(10)]
  exs = [records.clip_example(f"vid{i}", frames, [f"cap {i}"], 4.0) for i in range(7)]
  with records.ShardedWriter(str(tmp_path), "train", 3) as w:
    for ex in exs:
      w.write(ex)
  names = sorted(n for n in os.listdir(tmp_path) if n.endswith(".tfrecord"))
  # Each shard has its manifest: records and bytes as written, the split's count their sum.
  assert [records.read_manifest(str(tmp_path / n))["records"] for n in names] == [3, 2, 2]
  assert records.read_manifest(str(tmp_path / names[0]))["bytes"] == os.path.getsize(
      tmp_path / names[0])
  assert records.expected_count(str(tmp_path), "train") == 7
  assert records.check_shard(str(tmp_path / names[0])) is None
  with open(tmp_path / names[0], "r+b") as f:  # cut inside the second record
    f.truncate(os.path.getsize(tmp_path / names[0]) * 1 // 2)
  lost, reason = records.check_shard(str(tmp_path / names[0]))
  assert lost == 2 and "1 of 3 records readable" in reason
  shutil.copyfile(tmp_path / names[1], tmp_path / "copy.tfrecord")  # no manifest: just opened
  assert records.check_shard(str(tmp_path / "copy.tfrecord")) is None
  (tmp_path / "junk.tfrecord").write_bytes(b"not a tfrecord at all")
  assert records.check_shard(str(tmp_path / "junk.tfrecord"))[1].startswith("cannot be read")
  records.remove_shard(str(tmp_path / names[0]))
  assert not os.path.exists(records.manifest_path(str(tmp_path / names[0])))
  for n in ("copy.tfrecord", "junk.tfrecord"):
    os.remove(tmp_path / n)


def test_sharded_writer_crash_leaves_no_shard(tmp_path):
  with pytest.raises(RuntimeError):
    with records.ShardedWriter(str(tmp_path), "val", 2) as w:
      w.write(records.clip_example("a", [_jpeg(1)], ["x"], 1.0))
      raise RuntimeError("crash")
  assert os.listdir(tmp_path) == []


def test_split_files_errors(tmp_path):
  missing = str(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="nope"):
    records.split_files(missing, "train")
  for split in ("train", "val"):
    with records.ShardedWriter(str(tmp_path), split, 1) as w:
      w.write(records.clip_example("a", [_jpeg(1)], ["x"], 1.0))
  with pytest.raises(FileNotFoundError, match=r"'test'.*\['train', 'val'\]"):
    records.split_files(str(tmp_path), "test")


# ---------------------------------------------------------------------------- frame sampling
def _reference(n, t, mode, u):
  """Independent numpy formulation of the three sampling modes."""
  if mode == "rand":
    edges = np.floor(np.linspace(0, n, t + 1) + 1e-9).astype(int)
    return np.array([edges[i] + min(int(np.floor(u[i] * (edges[i + 1] - edges[i]))),
                                    max(edges[i + 1] - edges[i] - 1, 0)) for i in range(t)])
  if mode == "uniform":
    return np.floor((np.arange(t) + 0.5) * n / t + 1e-9).astype(int)
  if t == 1:
    return np.zeros(1, int)
  return np.floor(np.linspace(0, n - 1, t) + 0.5 + 1e-9).astype(int)  # round half up


@pytest.mark.parametrize("mode", pipeline.SAMPLING_MODES)
def test_frame_indices_match_reference(mode):
  rng = np.random.default_rng(0)
  for n in (1, 2, 3, 4, 7, 8, 16, 33):
    for t in (1, 2, 4, 8):
      for _ in range(3 if mode == "rand" else 1):
        u = rng.random(t).astype(np.float32)
        got = pipeline.frame_indices(tf.constant(n), t, mode, tf.constant(u)).numpy()
        np.testing.assert_array_equal(got, _reference(n, t, mode, u), err_msg=f"{mode} {n} {t}")
        assert got.min() >= 0 and got.max() < n and np.all(np.diff(got) >= 0)
        if mode == "rand" and n >= t:  # one index in each of the T equal segments
          i = np.arange(t)
          assert ((i * n // t <= got) & (got < (i + 1) * n // t)).all()
        if mode == "headtail" and t > 1:
          assert got[0] == 0 and got[-1] == n - 1
        if n < t:  # fewer stored frames than T: every stored frame used, some repeated
          assert set(got) == set(range(n))


def test_frame_indices_rand_covers_segment():
  # Over many draws every frame of the segment is picked: the index is random, not fixed.
  seen = set()
  for s in range(200):
    u = tf.random.stateless_uniform([4], seed=[s, 0])
    seen.add(int(pipeline.frame_indices(tf.constant(16), 4, "rand", u).numpy()[1]))
  assert seen == {4, 5, 6, 7}


# ------------------------------------------------------------------------------ text / MLM
def test_mlm_mask_rates_and_specials():
  rng = np.random.default_rng(0)
  b, length, vocab = 4000, 24, 300
  special = [0, 1, 2, 3, 4]
  lengths = rng.integers(3, length + 1, size=b)
  ids = rng.integers(5, vocab, size=(b, length)).astype(np.int32)
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  ids[:, 0] = 2
  ids[np.arange(b), lengths - 1] = 3
  ids[mask == 0] = 0
  ids[::7, 1] = 1  # an [UNK] now and then: special, never chosen
  mlm_ids, labels = text.mlm_mask(ids, mask, np.random.default_rng(1), vocab_size=vocab,
                                  mask_id=4, special_ids=special, prob=0.15)
  assert mlm_ids.dtype == np.int32 and labels.dtype == np.int32
  eligible = (mask == 1) & ~np.isin(ids, special)
  chosen = labels != -100
  assert not (chosen & ~eligible).any()  # never special or pad
  np.testing.assert_array_equal(mlm_ids[~chosen], ids[~chosen])
  np.testing.assert_array_equal(labels[chosen], ids[chosen])
  assert abs(chosen.sum() / eligible.sum() - 0.15) < 0.005
  masked = (mlm_ids == 4) & chosen
  kept = (mlm_ids == ids) & chosen
  randomised = chosen & ~masked & ~kept
  n = chosen.sum()
  assert abs(masked.sum() / n - 0.8) < 0.015
  assert abs(kept.sum() / n - 0.1) < 0.01  # (+ a random draw equal to the original: ~0.03 %)
  assert abs(randomised.sum() / n - 0.1) < 0.01
  assert not np.isin(mlm_ids[randomised], special).any()
  again = text.mlm_mask(ids, mask, np.random.default_rng(1), vocab_size=vocab, mask_id=4,
                        special_ids=special)
  np.testing.assert_array_equal(again[0], mlm_ids)


def test_tokenize_pads_truncates_and_knows_the_corpus(corpus, tok):
  assert tok.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]",
                                                        "[MASK]"]
  ids, mask = text.tokenize(tok, ["a small red circle moves to the left", "x " * 40], 8)
  assert ids.shape == mask.shape == (2, 8) and ids.dtype == mask.dtype == np.int32
  assert ids[0, 0] == tok.cls_token_id and ids[1, -1] == tok.sep_token_id and mask[1].all()
  assert tok.unk_token_id not in ids
  ids, mask = text.tokenize(tok, ["a circle"], 8)
  np.testing.assert_array_equal(mask[0], [1, 1, 1, 1, 0, 0, 0, 0])
  assert ids[0, 3] == tok.sep_token_id and (ids[0, 4:] == 0).all()
  with pytest.raises(FileNotFoundError, match="missing"):
    tokenizer.load_tokenizer(os.path.join(corpus, "missing", "vocab.txt"))


# ----------------------------------------------------------------------------------- Loader
def test_loader_batch_layout(corpus, tok):
  b = next(_loader(corpus, tok))
  assert set(b) == set(pipeline.BATCH_KEYS)
  assert b["video"].shape == (4, T, SIZE, SIZE, 3) and b["video"].dtype == np.float32
  for k in ("text_ids", "text_mask", "mlm_ids", "mlm_labels"):
    assert b[k].shape == (4, LEN) and b[k].dtype == np.int32, k
  assert b["valid"].dtype == bool and b["valid"].all()
  assert b["video_id"].shape == (4,) and all(v.startswith(b"shapes-train-") for v in b["video_id"])
  # Each clip's class, as its record holds it.
  stored = {r[records.VIDEO_ID][0]: r[records.LABEL_INDEX][0]
            for f in records.split_files(corpus, "train") for r in map(
                records.example_to_dict, records.read_records(f))}
  assert b["label"].dtype == np.int32
  assert b["label"].tolist() == [stored[v] for v in b["video_id"]]
  lo = (0 - np.array(pipeline.CLIP_MEAN)) / np.array(pipeline.CLIP_STD)
  hi = (1 - np.array(pipeline.CLIP_MEAN)) / np.array(pipeline.CLIP_STD)
  assert (b["video"] >= lo - 1e-3).all() and (b["video"] <= hi + 1e-3).all()
  assert b["video"].std() > 0.1
  assert (b["text_ids"][:, 0] == tok.cls_token_id).all()


def test_loader_process_files_disjoint_and_complete(corpus, tok):
  all_files = records.split_files(corpus, "train")
  parts = [_loader(corpus, tok, process_index=p, process_count=3).files for p in range(3)]
  assert sum(len(p) for p in parts) == len(all_files)
  assert sorted(f for p in parts for f in p) == all_files
  with pytest.raises(ValueError, match="process 4 of 5"):
    _loader(corpus, tok, process_index=4, process_count=5)


def test_eval_pass_is_exhaustive_and_padded(corpus, tok):
  batches = list(_loader(corpus, tok, "val", training=False, batch_size=4))
  assert len(batches) == 3  # 10 clips
  got = [v for b in batches for v, ok in zip(b["video_id"], b["valid"]) if ok]
  assert sorted(got) == sorted(_ids_in(corpus, "val")) and len(got) == 10
  last = batches[-1]
  np.testing.assert_array_equal(last["valid"], [True, True, False, False])
  assert list(last["video_id"][2:]) == [b"", b""]
  assert (last["mlm_labels"][2:] == -100).all() and (last["video"][2:] == 0).all()
  # Eval is deterministic and uses the first caption.
  again = list(_loader(corpus, tok, "val", training=False, batch_size=4, seed=9))
  for a, b in zip(batches, again):
    np.testing.assert_array_equal(a["video"], b["video"])
    np.testing.assert_array_equal(a["text_ids"], b["text_ids"])
  first_caps = {}
  for f in records.split_files(corpus, "val"):
    for r in records.read_records(f):
      d = records.example_to_dict(r)
      first_caps[d[records.VIDEO_ID][0]] = d[records.CAPTIONS][0].decode()
  ids, _ = text.tokenize(tok, [first_caps[batches[0]["video_id"][0]]], LEN)
  np.testing.assert_array_equal(batches[0]["text_ids"][0], ids[0])


def test_loader_same_seed_same_batches(corpus, tok):
  a = _loader(corpus, tok, seed=5)
  b = _loader(corpus, tok, seed=5)
  c = _loader(corpus, tok, seed=6)
  for _ in range(3):
    x, y, z = next(a), next(b), next(c)
    _assert_same(x, y)
  assert not np.array_equal(x["video"], z["video"])


def test_loader_save_restore_continues_exactly(corpus, tok, tmp_path):
  full = _loader(corpus, tok, seed=1)
  expected = [next(full) for _ in range(6)]  # 24 clips: crosses the shuffle buffer refill
  part = _loader(corpus, tok, seed=1)
  for _ in range(2):
    next(part)
  part.save(str(tmp_path / "loader"))
  next(part)  # moving on after saving must not matter
  resumed = _loader(corpus, tok, seed=1)
  resumed.restore(str(tmp_path / "loader"))
  assert resumed.step == 2
  for want in expected[2:]:
    _assert_same(next(resumed), want)


def test_loader_clear_errors(corpus, tok, tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    _loader(str(tmp_path / "nowhere"), tok)
  with pytest.raises(FileNotFoundError, match=r"'nosuch'.*'train'"):
    _loader(corpus, tok, split="nosuch")
  cfg = _data_cfg(train_sampling="sideways")
  with pytest.raises(ValueError, match="sideways"):
    _loader(corpus, tok, cfg=cfg)


def _write_clips(d, split, clips, num_shards):
  with records.ShardedWriter(d, split, num_shards) as w:
    for vid, frames in clips:
      w.write(records.clip_example(vid, frames, [f"a red circle {vid}"], 4.0))


def test_empty_shard_is_tolerated(tmp_path, tok):
  d = str(tmp_path)
  _write_clips(d, "train", [(f"c{i}", [_jpeg(10 * i)] * 3) for i in range(3)], 4)
  assert os.path.getsize(records.split_files(d, "train")[3]) == 0
  b = next(_loader(d, tok, batch_size=2))
  assert b["valid"].all()
  ev = list(_loader(d, tok, training=False, batch_size=2))
  assert sorted(v for x in ev for v in x["video_id"] if v) == [b"c0", b"c1", b"c2"]
  # A process whose only file is empty: eval yields nothing, training says why.
  assert list(_loader(d, tok, training=False, process_index=3, process_count=4)) == []
  with pytest.raises(ValueError, match="process 3.*empty"):
    _loader(d, tok, process_index=3, process_count=4)


def test_corrupt_jpeg_clips_are_skipped_and_counted(tmp_path, tok):
  d = str(tmp_path)
  good = _jpeg(100)
  clips = [(f"ok{i}", [good] * 4) for i in range(6)]
  clips.insert(2, ("garbage", [b"\x00\x01garbage" * 10] * 4))
  clips.append(("truncated", [good[: len(good) // 2]] * 4))  # last: dropped after the last good
  _write_clips(d, "val", clips, 1)
  ev = _loader(d, tok, "val", training=False, batch_size=4)
  got = [v for b in ev for v, ok in zip(b["video_id"], b["valid"]) if ok]
  assert got == [f"ok{i}".encode() for i in range(6)]
  assert ev.skipped == 2

  _write_clips(d, "train", clips, 2)
  tr = _loader(d, tok, "train", training=True, batch_size=4)
  seen = set()
  for _ in range(6):
    seen.update(next(tr)["video_id"])
  assert seen == {f"ok{i}".encode() for i in range(6)}
  assert tr.skipped >= 2  # 4 epochs of good clips delivered; the bad ones come each epoch


def test_short_clips_repeat_frames(tmp_path, tok):
  d = str(tmp_path)
  _write_clips(d, "test", [("still", [_jpeg(50)]), ("two", [_jpeg(0), _jpeg(250)])], 1)
  cfg = _data_cfg()
  ev = pipeline.Loader(cfg, "test", batch_size=2, training=False, seed=0, tokenizer=tok,
                       num_frames=4, image_size=SIZE, data_dir=d)
  v = next(ev)["video"]
  assert v.shape == (2, 4, SIZE, SIZE, 3)
  for f in range(1, 4):
    np.testing.assert_array_equal(v[0, f], v[0, 0])  # a still image repeated to T
  # 2 stored frames, T=4 uniform: 0, 0, 1, 1
  np.testing.assert_array_equal(v[1, 1], v[1, 0])
  np.testing.assert_array_equal(v[1, 3], v[1, 2])
  assert np.abs(v[1, 0] - v[1, 2]).mean() > 1.0


def test_same_crop_for_all_frames(tmp_path, tok):
  d = str(tmp_path)
  _write_clips(d, "train", [(f"c{i}", [_jpeg(60, size=48)] * 4) for i in range(4)], 1)
  cfg = _data_cfg(crop_scale=(0.3, 0.5), flip=True)
  b = next(_loader(d, tok, batch_size=4, cfg=cfg))
  v = b["video"]
  for f in range(1, T):
    np.testing.assert_allclose(v[:, f], v[:, 0])  # identical frames -> identical crops
  assert not np.allclose(v[0, 0], v[1, 0]) or not np.allclose(v[0, 0], v[2, 0])


# ------------------------------------------------------------------------------ RandomLoader
def test_random_loader_global_batch_independent_of_processes(tmp_path):
  kw = dict(batch_size_global=8, num_frames=2, image_size=8, max_text_len=10, vocab_size=50,
            seed=3)
  one = random_source.RandomLoader(process_index=0, process_count=1, **kw)
  two = [random_source.RandomLoader(process_index=p, process_count=2, **kw) for p in range(2)]
  for _ in range(2):
    whole = next(one)
    halves = [next(r) for r in two]
    for k in whole:
      np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), whole[k], err_msg=k)
  assert set(whole) == set(pipeline.BATCH_KEYS)
  assert whole["video"].dtype == np.float32 and whole["video"].shape == (8, 2, 8, 8, 3)
  for k in ("text_ids", "text_mask", "mlm_ids", "mlm_labels"):
    assert whole[k].dtype == np.int32 and whole[k].shape == (8, 10)
  ids, mask = whole["text_ids"], whole["text_mask"]
  assert (ids[:, 0] == 2).all() and whole["valid"].all()
  lengths = mask.sum(1)
  assert (ids[np.arange(8), lengths - 1] == 3).all() and (ids[mask == 0] == 0).all()
  assert len(set(lengths)) > 1
  body = ids[(mask == 1) & (np.arange(10) > 0) & (np.arange(10)[None] < lengths[:, None] - 1)]
  assert body.min() > 4
  # save / restore the step
  path = str(tmp_path / "rand.json")
  one.save(path)
  want = next(one)
  fresh = random_source.RandomLoader(process_index=0, process_count=1, **kw)
  fresh.restore(path)
  assert json.load(open(path))["step"] == 2
  _assert_same(next(fresh), want)


def test_text_and_random_source_do_not_import_tensorflow():
  code = ("import sys; import vlp_jax.data.random_source, vlp_jax.data.text; "
          "assert 'tensorflow' not in sys.modules and 'transformers' not in sys.modules")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_eval_batches_carry_contrast_probes(corpus, tok):
  probes = {}
  for f in records.split_files(corpus, "val"):
    for r in records.read_records(f):
      d = records.example_to_dict(r)
      probes[d[records.VIDEO_ID][0]] = [p.decode() for p in d.get(records.CONTRAST, [])]
  assert any(probes.values()) and not all(probes.values())
  for b in _loader(corpus, tok, "val", training=False, batch_size=4):
    assert b["probe_ids"].shape == (4, 2, LEN) and b["has_probe"].dtype == bool
    for i, vid in enumerate(b["video_id"]):
      want = probes.get(vid, [])
      assert b["has_probe"][i] == (bool(b["valid"][i]) and len(want) == 2)
      if b["has_probe"][i]:
        ids, _ = text.tokenize(tok, want, LEN)
        np.testing.assert_array_equal(b["probe_ids"][i], ids)
  train = next(iter(_loader(corpus, tok, "train", training=True)))
  assert "probe_ids" not in train  # probes are an evaluation-only input


def test_a_tokenizer_directory_loads_offline_and_without_mask_token_skips_mlm(tmp_path):
  """data.vocab may name a transformers tokenizer directory (e.g. CLIP's BPE); one without
  [MASK] tokenises with its own start / end tokens and makes no MLM labels."""
  from tokenizers import Tokenizer, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast

  from vlp_jax.data import text as text_lib
  from vlp_jax.data import tokenizer as tok_lib
  vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, "a": 4, "red": 5, "circle": 6}
  backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  backend.pre_tokenizer = pre_tokenizers.Whitespace()
  backend.post_processor = processors.TemplateProcessing(
      single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
  fast = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                 bos_token="<s>", eos_token="</s>")
  fast.save_pretrained(str(tmp_path / "tok"))
  tok = tok_lib.load_tokenizer(str(tmp_path / "tok"))
  ids, mask = text_lib.tokenize(tok, ["a red circle"], 8)
  assert ids.tolist() == [[2, 4, 5, 6, 3, 0, 0, 0]] and mask.tolist() == [[1] * 5 + [0] * 3]
  assert tok.mask_token_id is None
  mlm_ids, labels = text_lib.mlm_mask(ids, mask, np.random.default_rng(0), vocab_size=len(tok),
                                      mask_id=None, special_ids=tok.all_special_ids, prob=0.9)
  assert (mlm_ids == ids).all() and (labels == text_lib.IGNORE_LABEL).all()
  PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(
      str(tmp_path / "nopad"))
  with pytest.raises(ValueError, match="no padding token"):
    tok_lib.load_tokenizer(str(tmp_path / "nopad"))


def _swap_naive(caption: str) -> str:
  table = dict(synthetic.REVERSED_WORDS)
  return " ".join(table.get(w, w) for w in caption.split())


def test_reversed_twin_vocabulary_names_the_opposite_motion():
  """Every direction phrase of the synthetic corpus, rewritten, names the opposite motion."""
  table = dict(synthetic.REVERSED_WORDS)
  for motion, opposite in synthetic.OPPOSITE.items():
    theirs = {w for p in sum(synthetic.MOTION_PHRASES[opposite], ()) for w in p.split()}
    for phrase in sum(synthetic.MOTION_PHRASES[motion], ()):
      rewritten = _swap_naive(phrase)
      direction = {w for w in rewritten.split() if w in table}
      assert direction and direction <= theirs, (phrase, rewritten)
  got = pipeline.swap_words(tf.constant(["a red circle moves left and a square rises",
                                         "the leftover ball stays still"]),
                            synthetic.REVERSED_WORDS).numpy()
  assert got.tolist() == [b"a red circle moves right and a square falls",
                          b"the leftover ball stays still"]  # whole words only
  assert pipeline.parse_swap("opens:closes, in>out") == (("opens", "closes"),
                                                         ("closes", "opens"), ("in", "out"))
  with pytest.raises(ValueError, match="reverse_twins.swap"):
    pipeline.parse_swap("left-right")


def test_reversed_twins_are_clips_played_backwards_with_the_opposite_caption(corpus, tok):
  b, n = 8, 4
  cfg = _data_cfg()
  cfg.reverse_twins.rate = 0.5
  plain, twins = _loader(corpus, tok, batch_size=b), _loader(corpus, tok, batch_size=b, cfg=cfg)
  reversed_rows = 0
  for _ in range(3):
    x, y = next(plain), next(twins)
    for k in ("video", "text_ids", "video_id"):  # the first B - n rows are untouched
      np.testing.assert_array_equal(y[k][:b - n], x[k][:b - n])
    for i in range(n):
      j = b - n + i
      caption = tok.decode(x["text_ids"][i], skip_special_tokens=True)
      swapped = _swap_naive(caption)
      if swapped == caption:  # no direction word: the row stays as it was
        np.testing.assert_array_equal(y["video"][j], x["video"][j])
        continue
      reversed_rows += 1
      np.testing.assert_array_equal(y["video"][j], x["video"][i][::-1])
      want_ids, _ = text.tokenize(tok, [swapped], LEN)
      np.testing.assert_array_equal(y["text_ids"][j], want_ids[0])
      assert y["video_id"][j] == x["video_id"][i] + b"#reversed"
      # The offsets pair exactly these rows, both ways (VTM's twin negatives).
      assert (y["twin"][i], y["twin"][j]) == (b - n, n - b)
    for i in range(b):  # every other row has no twin
      if y["twin"][i]:
        assert y["video_id"][i + y["twin"][i]].removesuffix(b"#reversed") == \
            y["video_id"][i].removesuffix(b"#reversed")
      else:
        assert not y["video_id"][i].endswith(b"#reversed")
    assert y["twin"].dtype == np.int32 and "twin" not in x
  assert reversed_rows >= 3
