"""The synthetic corpus as mp4 files + annotation files: decoding, annotation formats, an
ingest round trip into records, determinism, and the command line."""
import filecmp
import os
import shlex
import subprocess
import sys

import av
import numpy as np
import pytest

from vlp_jax.data import records, synthetic
from vlp_jax.data import synthetic_videos as sv
from vlp_jax.data.ingest import annotations as ann_lib
from vlp_jax.data.ingest import decode, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED, FRAMES, SIZE = 3, 4, 24
COUNTS = dict(num_train=4, num_val=1, num_test=3, num_test_unseen=2, num_images=2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("shapes_videos"))
  summary = sv.write(out, seed=SEED, num_frames=FRAMES, image_size=SIZE, **COUNTS)
  return out, summary


def _rendered(split, index):
  frames = 1 if split == synthetic.IMAGE_SPLIT else FRAMES
  return synthetic.render_clip(SEED, split, index, frames, SIZE, synthetic.heldout_pairs(SEED))


def _rgb(jpegs):
  return np.stack([sv.decode_jpeg(f) for f in jpegs]).astype(np.float32)


def _mad(a, b):
  return float(np.abs(a - b).mean())


def test_summary_and_files(corpus):
  out, summary = corpus
  assert summary["counts"] == dict(train=4, val=1, test=3, test_unseen=2, images=2)
  assert sorted(os.listdir(os.path.join(out, sv.VIDEO_DIR))) == sorted(
      f"shapes-{s}-{i:06d}.mp4" for s, n in summary["counts"].items() if s != "images"
      for i in range(n))
  assert sorted(os.listdir(os.path.join(out, sv.IMAGE_DIR))) == [
      "shapes-images-000000.jpg", "shapes-images-000001.jpg"]
  assert summary["files"]["test"] == ["test.jsonl", "msrvtt_test.jsonl", "msrvtt_qa_test.json"]
  assert summary["files"]["images"] == ["images.jsonl"]
  with open(os.path.join(out, sv.CLASSES_FILE)) as f:
    assert f.read().splitlines() == [synthetic.LABEL_TEXT[m] for m in synthetic.MOTIONS]


def test_videos_decode_to_the_rendered_frames(corpus):
  out, summary = corpus
  directional, mads = 0, []
  for split in synthetic.SPLITS:
    for i in range(summary["counts"][split]):
      clip = _rendered(split, i)
      with av.open(sv.video_path(out, clip["video_id"])) as c:
        stream = c.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert float(stream.average_rate) == synthetic.FPS
        assert float(stream.duration * stream.time_base) == pytest.approx(FRAMES / synthetic.FPS)
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(stream)]
      assert len(frames) == FRAMES and frames[0].shape == (SIZE, SIZE, 3)
      got, ref = np.stack(frames).astype(np.float32), _rgb(clip["frames"])
      # H.264 + 4:2:0 chroma: small differences (mostly background noise, colour edges)...
      mads.append(_mad(got, ref))
      assert mads[-1] < 12.0, clip["video_id"]
      # ... well below the difference to another clip (>= 16 over 60 clips).
      if summary["counts"][split] > 1:
        other = _rgb(_rendered(split, (i + 1) % summary["counts"][split])["frames"])
        assert _mad(got, other) > 1.5 * mads[-1]
      if clip["objects"][0]["motion"] in synthetic.OPPOSITE and len(clip["objects"]) == 1:
        directional += 1  # frame k is closest to rendered frame k: order kept
        for k in range(FRAMES):
          assert np.argmin([_mad(got[k], r) for r in ref]) == k
  assert directional >= 2 and np.mean(mads) < 8.0
  for i in range(2):  # still images: the renderer's JPEG, unchanged
    clip = _rendered("images", i)
    with open(sv.image_path(out, clip["video_id"]), "rb") as f:
      assert f.read() == clip["frames"][0]


def test_annotations_parse_in_every_format(corpus):
  out, summary = corpus
  classes = os.path.join(out, sv.CLASSES_FILE)
  for split, n in summary["counts"].items():
    ann = ann_lib.parse("jsonl", os.path.join(out, f"{split}.jsonl"), classes=classes)
    assert len(ann.clips) == n
    for i, c in enumerate(ann.clips):
      r = _rendered(split, i)
      assert c.error is None and c.id == r["video_id"]
      assert c.still == (split == "images")
      assert list(c.captions) == r["captions"] and len(c.captions) == 3
      assert (c.label_index, c.label_text) == (r["label_index"], r["label_text"])
      assert list(c.questions) == r["questions"] and list(c.answers) == r["answers"]
      assert len(c.questions) >= 1
  test = [_rendered("test", i) for i in range(3)]
  ret = ann_lib.parse("msrvtt", os.path.join(out, "msrvtt_test.jsonl"))
  assert [(c.id, list(c.captions)) for c in ret.clips] == [
      (r["video_id"], r["captions"]) for r in test]
  qa = ann_lib.parse("msrvtt_qa", os.path.join(out, "msrvtt_qa_test.json"))
  assert [(c.id, list(c.questions), list(c.answers)) for c in qa.clips] == [
      (r["video_id"], r["questions"], r["answers"]) for r in test]
  assert not any(c.error for c in ret.clips + qa.clips)


def _records(out_dir, split):
  return [records.example_to_dict(r) for p in records.split_files(out_dir, split)
          for r in records.read_records(p)]


def _ingest(corpus_dir, fmt, annotations, split, out_dir, root=sv.VIDEO_DIR):
  ann = ann_lib.parse(fmt, os.path.join(corpus_dir, annotations),
                      classes=os.path.join(corpus_dir, sv.CLASSES_FILE))
  settings = decode.DecodeSettings(video_root=os.path.join(corpus_dir, root),
                                   fps=synthetic.FPS, short_side=SIZE)
  return run.ingest(ann, out_dir=out_dir, split=split, settings=settings, num_shards=2,
                    workers=0, vocab=os.path.join(corpus_dir, sv.VOCAB_FILE), progress=False)


def test_ingest_round_trip(corpus, tmp_path):
  src, _ = corpus
  out = str(tmp_path / "records")
  s = _ingest(src, "jsonl", "train.jsonl", "train", out)
  assert (s["written"], s["skipped"], s["partial"], s["frames"]) == (4, 0, 0, 4 * FRAMES)
  by_id = {r[records.VIDEO_ID][0].decode(): r for r in _records(out, "train")}
  for i in range(4):
    clip = _rendered("train", i)
    ex = by_id[clip["video_id"]]
    assert [c.decode() for c in ex[records.CAPTIONS]] == clip["captions"]
    assert ex[records.LABEL_INDEX] == [clip["label_index"]]
    assert ex[records.LABEL_TEXT] == [clip["label_text"].encode()]
    assert [q.decode() for q in ex[records.QUESTIONS]] == clip["questions"]
    assert [a.decode() for a in ex[records.ANSWERS]] == clip["answers"]
    assert ex[records.NUM_FRAMES] == [FRAMES] and ex[records.FPS] == [synthetic.FPS]
    assert ex[records.END] == [round(FRAMES / synthetic.FPS * 1e6)]
    frames = _rgb(ex[records.FRAMES])  # H.264 then JPEG again
    assert frames.shape == (FRAMES, SIZE, SIZE, 3)
    assert _mad(frames, _rgb(clip["frames"])) < 12.0

  s = _ingest(src, "msrvtt_qa", "msrvtt_qa_test.json", "test", out)
  assert s["written"] == 3
  got = {r[records.VIDEO_ID][0].decode(): [a.decode() for a in r[records.ANSWERS]]
         for r in _records(out, "test")}
  assert got == {r["video_id"]: r["answers"] for r in (_rendered("test", i) for i in range(3))}

  s = _ingest(src, "jsonl", "images.jsonl", "images", out, root=sv.IMAGE_DIR)
  assert s["written"] == 2
  for ex in _records(out, "images"):
    assert ex[records.NUM_FRAMES] == [1] and ex[records.CAPTIONS]
  with open(os.path.join(out, "vocab.txt")) as f, open(os.path.join(src, sv.VOCAB_FILE)) as g:
    assert f.read() == g.read()


def test_deterministic_with_workers_and_stale_files_removed(corpus, tmp_path):
  src, _ = corpus
  other = str(tmp_path / "again")
  sv.write(other, seed=SEED, num_frames=FRAMES, image_size=SIZE, workers=1, **COUNTS)
  for folder in ("", sv.VIDEO_DIR, sv.IMAGE_DIR):
    names = sorted(n for n in os.listdir(os.path.join(src, folder)) if n != sv.MARKER)
    assert names == sorted(n for n in os.listdir(os.path.join(other, folder)) if n != sv.MARKER)
    files = [n for n in names if os.path.isfile(os.path.join(src, folder, n))]
    _, mismatch, errors = filecmp.cmpfiles(os.path.join(src, folder),
                                           os.path.join(other, folder), files, shallow=False)
    assert not mismatch and not errors
  # Rewriting a smaller corpus into the directory leaves no stale media behind.
  sv.write(other, seed=SEED, num_train=2, num_val=0, num_test=0, num_test_unseen=0,
           num_frames=2, image_size=SIZE)
  assert sorted(os.listdir(os.path.join(other, sv.VIDEO_DIR))) == [
      "shapes-train-000000.mp4", "shapes-train-000001.mp4"]
  assert os.listdir(os.path.join(other, sv.IMAGE_DIR)) == []
  assert sorted(n for n in os.listdir(other) if "json" in n) == [
      "msrvtt_qa_train.json", "msrvtt_train.jsonl", sv.MARKER, "train.jsonl"]


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="image_size must be even"):
    sv.write(str(tmp_path / "a"), seed=0, num_train=1, num_val=0, num_test=0,
             num_test_unseen=0, num_frames=2, image_size=25)
  with pytest.raises(ValueError, match="num_frames"):
    sv.write(str(tmp_path / "a"), seed=0, num_train=1, num_val=0, num_test=0,
             num_test_unseen=0, num_frames=0, image_size=24)
  with pytest.raises(ValueError, match="number of val clips"):
    sv.write(str(tmp_path / "a"), seed=0, num_train=1, num_val=-1, num_test=0,
             num_test_unseen=0, num_frames=2, image_size=24)
  assert not os.path.exists(tmp_path / "a")  # checked before anything is written
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="foreign"):
    sv.write(str(foreign), seed=0, num_train=1, num_val=0, num_test=0, num_test_unseen=0,
             num_frames=2, image_size=24)
  assert os.listdir(foreign) == ["notes.txt"]


def test_command_line_prints_working_ingest_commands(tmp_path):
  out, data = str(tmp_path / "videos"), str(tmp_path / "data")
  cmd = [sys.executable, "-m", "launch.synthetic_videos", f"--out={out}", "--preset=tiny",
         "--num_train=2", "--num_val=1", "--num_test=2", "--num_test_unseen=1",
         "--num_images=1", "--num_frames=2", "--image_size=16", "--num_shards=1",
         "--workers=0", "--progress=false", f"--data_dir={data}"]
  res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                       check=False)
  assert res.returncode == 0, res.stderr
  lines = res.stdout.splitlines()
  assert lines[0].startswith("wrote 7 clips (train 2, val 1, test 2, test_unseen 1, images 1)")
  ingest = [line for line in lines if line.startswith("python -m launch.ingest")]
  args = [dict(a[2:].split("=", 1) for a in shlex.split(c)[3:]) for c in ingest]
  assert [a["split"] for a in args] == ["train", "val", "test", "test_unseen", "images"]
  assert all(a["out"] == data and a["fps"] == "4" and a["short_side"] == "16" for a in args)
  assert any(line.startswith("python -m launch.entities") for line in lines)
  assert lines[-1].endswith(f"--config.data.dir={data} --config.data.synthetic.generate=False")
  # The printed command for `test` runs as is (the others differ only in split and files).
  test_cmd = shlex.split(ingest[2])
  res = subprocess.run([sys.executable] + test_cmd[1:] + ["--workers=0", "--progress=false"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       check=False)
  assert res.returncode == 0, res.stderr
  got = [r[records.CAPTIONS] for r in _records(data, "test")]
  assert len(got) == 2 and all(len(c) == 3 for c in got)
  res = subprocess.run(cmd[:4] + ["--image_size=15"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, check=False)
  assert res.returncode != 0 and "image_size must be even" in res.stderr
