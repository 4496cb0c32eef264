"""Ingestion of the action recognition / localisation formats (HMDB51 and UCF101 split files,
THUMOS14 and ActivityNet temporal annotations): labels, class texts, captions and segment
fields of the written records, bad rows by file:line, undecodable videos skipped."""
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import av
import numpy as np
import pytest
import tensorflow as tf

from vlp_jax.data import records
from vlp_jax.data.ingest import annotations as ann_lib
from vlp_jax.data.ingest import decode, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F32 = lambda x: float(np.float32(x))  # segment times are stored as float32


def _write_video(path, codec="libx264", n=8, rate=8):
  """A 1-s 32x32 video whose brightness rises frame by frame."""
  with av.open(path, "w") as c:
    s = c.add_stream(codec, rate=rate)
    s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
    for i in range(n):
      img = np.full((32, 32, 3), 20 + 25 * i, np.uint8)
      for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
        c.mux(p)
    for p in s.encode():
      c.mux(p)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  """One tiny video per container, copied into each dataset layout."""
  d = tmp_path_factory.mktemp("src")
  out = {ext: str(d / f"src{ext}") for ext in (".mp4", ".avi", ".mkv")}
  _write_video(out[".mp4"])
  _write_video(out[".avi"], codec="mpeg4")
  _write_video(out[".mkv"])
  out["garbage"] = str(d / "garbage")
  with open(out["garbage"], "wb") as f:
    f.write(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
  return out


def _put(src, root, rel):
  path = os.path.join(root, rel)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  shutil.copyfile(src, path)


def _write(directory, name, text):
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, name)
  with open(path, "w") as f:
    f.write(text)
  return path


def _ingest(ann, video_root, out, split):
  settings = decode.DecodeSettings(video_root=str(video_root), fps=2.0, short_side=16)
  summary = run.ingest(ann, out_dir=str(out), split=split, settings=settings, num_shards=1,
                       workers=0, progress=False)
  clips = {}
  for path in records.split_files(str(out), split):
    for r in records.read_records(path):
      ex = records.example_to_dict(r)
      clips[ex[records.VIDEO_ID][0].decode()] = ex
  with open(os.path.join(out, "skipped.jsonl")) as f:
    skipped = [json.loads(line) for line in f]
  return summary, clips, skipped


def _labels(ex):
  """(label index, label text, captions), None for an absent label."""
  return (ex.get(records.LABEL_INDEX, [None])[0], ex.get(records.LABEL_TEXT, [b""])[0].decode()
          or None, [c.decode() for c in ex[records.CAPTIONS]])


def _segments(ex):
  return (ex[records.SEGMENT_START], ex[records.SEGMENT_END], ex[records.SEGMENT_LABEL_INDEX])


# -------------------------------------------------------------------------------- HMDB51
def _hmdb(tmp_path, sources):
  ann = str(tmp_path / "testTrainMulti_7030_splits")
  _write(ann, "brush_hair_test_split1.txt", "b1.avi 1 \nb2.avi 2 \nb3.avi 0 \n")
  _write(ann, "kick_ball_test_split1.txt", "k1.avi 1 \nk2.avi 2 \nk3.avi 1 \n")
  _write(ann, "brush_hair_test_split2.txt", "b1.avi 2 \nb2.avi 1 \nb3.avi 0 \n")
  _write(ann, "kick_ball_test_split2.txt", "k1.avi 1 \nk2.avi 2 \nk3.avi 0 \n")
  root = str(tmp_path / "hmdb51")
  for rel in ("brush_hair/b1.avi", "brush_hair/b2.avi", "kick_ball/k1.avi", "k2.avi"):
    _put(sources[".avi"], root, rel)  # k2 directly under the root
  _put(sources["garbage"], root, "kick_ball/k3.avi")  # cannot be decoded
  return ann, root


def test_hmdb51_splits_labels_and_undecodable_video(tmp_path, sources):
  ann_dir, root = _hmdb(tmp_path, sources)
  ann = ann_lib.parse("hmdb51", ann_dir, split="train", split_id=1)
  assert ann.classes == ["brush hair", "kick ball"]
  assert [(c.id, c.source) for c in ann.clips] == [
      ("b1", "brush_hair_test_split1.txt:1"), ("k1", "kick_ball_test_split1.txt:1"),
      ("k3", "kick_ball_test_split1.txt:3")]
  summary, clips, skipped = _ingest(ann, root, tmp_path / "out", "train")
  assert sorted(clips) == ["b1", "k1"] and summary["classes"] == ["brush hair", "kick ball"]
  # classes.txt for `data.classes` = "": line i = label index i; another split's list must match.
  assert (tmp_path / "out" / "classes.txt").read_text() == "brush hair\nkick ball\n"
  with pytest.raises(ValueError, match="different class lists"):
    run._write_classes(str(tmp_path / "out"), ["kick ball", "brush hair"])
  assert _labels(clips["b1"]) == (0, "brush hair", ["brush hair"])
  assert _labels(clips["k1"]) == (1, "kick ball", ["kick ball"])
  assert clips["b1"][records.NUM_FRAMES] == [2] and records.SEGMENT_START not in clips["b1"]
  assert [(e["id"], e["source"], e["reason"].split(":")[0]) for e in skipped] == [
      ("k3", "kick_ball_test_split1.txt:3", "unreadable")]
  assert skipped[0]["video"] == os.path.join(root, "kick_ball", "k3.avi")
  assert (summary["written"], summary["skipped"]) == (2, 1)

  test2 = ann_lib.parse("hmdb51", ann_dir, split="test", split_id=2)
  assert [(c.id, c.label_index) for c in test2.clips] == [("b1", 0), ("k2", 1)]
  assert test2.clips[1].paths()[0] == "kick_ball/k2.avi" and "k2.avi" in test2.clips[1].paths()
  with pytest.raises(ValueError, match=r"--split names: one of \['train', 'test'\], got 'val'"):
    ann_lib.parse("hmdb51", ann_dir, split="val")
  with pytest.raises(FileNotFoundError, match="test_split3"):
    ann_lib.parse("hmdb51", ann_dir, split="train", split_id=3)

  bad = _write(str(tmp_path / "bad"), "ride_bike_test_split1.txt", "r1.avi 1\nr2.avi 7\nr3\n")
  with pytest.raises(ValueError, match=re.escape(f"{bad}:2: expected '<video file> <0|1|2>', "
                                                 "got 'r2.avi 7'")):
    ann_lib.parse("hmdb51", os.path.dirname(bad), split="train")
  clips = ann_lib.parse("hmdb51", os.path.dirname(bad), split="train", skip_bad_rows=True).clips
  assert [(c.id, c.source, (c.error or "").split(":")[0]) for c in clips] == [
      ("r1", "ride_bike_test_split1.txt:1", ""), ("", "ride_bike_test_split1.txt:2",
                                                  "malformed row"),
      ("", "ride_bike_test_split1.txt:3", "malformed row")]


def test_hmdb51_command_line(tmp_path, sources):
  ann_dir, root = _hmdb(tmp_path, sources)
  out = str(tmp_path / "cli")
  cmd = [sys.executable, "-m", "launch.ingest", "--format=hmdb51", f"--annotations={ann_dir}",
         "--split_id=2", "--split=test", f"--video_root={root}", f"--out={out}",
         "--num_shards=1", "--workers=0", "--fps=2", "--short_side=16", "--noprogress"]
  res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert res.returncode == 0, res.stderr[-2000:]
  assert "2 of 2 clips written" in res.stdout
  with open(os.path.join(out, "ingest.json")) as f:
    summary = json.load(f)["splits"]["test"]
  assert (summary["split_id"], summary["classes"]) == (2, ["brush hair", "kick ball"])
  assert cmd[5] == "--split_id=2"
  res = subprocess.run(cmd[:5] + ["--split_id=4"] + cmd[6:], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
  assert res.returncode != 0 and "--split_id must be 1, 2 or 3" in res.stderr


# -------------------------------------------------------------------------------- UCF101
def test_ucf101_class_index_lists_and_bad_rows(tmp_path, sources):
  assert [ann_lib.camel_words(n) for n in (
      "ApplyEyeMakeup", "YoYo", "HandstandPushups", "CleanAndJerk", "PlayingDaf")] == [
      "apply eye makeup", "yo yo", "handstand pushups", "clean and jerk", "playing daf"]
  lists = str(tmp_path / "ucfTrainTestlist")
  _write(lists, "classInd.txt", "1 ApplyEyeMakeup\n2 YoYo\n")
  _write(lists, "trainlist01.txt", "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi 1\n"
         "YoYo/v_YoYo_g01_c01.avi 2\n")
  test_list = _write(lists, "testlist01.txt", "applyeyemakeup/v_ApplyEyeMakeup_g02_c01.avi\n"
                     "YoYo/v_YoYo_g02_c01.avi\n")
  root = str(tmp_path / "UCF-101")
  for rel in ("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi", "YoYo/v_YoYo_g01_c01.avi",
              "ApplyEyeMakeup/v_ApplyEyeMakeup_g02_c01.avi", "v_YoYo_g02_c01.avi"):
    _put(sources[".avi"], root, rel)

  ann = ann_lib.parse("ucf101", lists, split="train", split_id=1)
  assert ann.classes == ["apply eye makeup", "yo yo"]
  summary, clips, skipped = _ingest(ann, root, tmp_path / "out", "train")
  assert sorted(clips) == ["v_ApplyEyeMakeup_g01_c01", "v_YoYo_g01_c01"] and not skipped
  assert _labels(clips["v_ApplyEyeMakeup_g01_c01"]) == (0, "apply eye makeup",
                                                        ["apply eye makeup"])
  assert _labels(clips["v_YoYo_g01_c01"]) == (1, "yo yo", ["yo yo"])

  # The test list: no labels; a class folder in another case, a video outside its folder.
  for path in (lists, test_list):
    ann = ann_lib.parse("ucf101", path, split="test")
    assert [(c.id, c.label_index, c.label_text, c.source) for c in ann.clips] == [
        ("v_ApplyEyeMakeup_g02_c01", 0, "apply eye makeup", "testlist01.txt:1"),
        ("v_YoYo_g02_c01", 1, "yo yo", "testlist01.txt:2")]
  summary, clips, skipped = _ingest(ann, root, tmp_path / "out", "test")
  assert sorted(clips) == ["v_ApplyEyeMakeup_g02_c01", "v_YoYo_g02_c01"] and not skipped

  bad = _write(lists, "trainlist02.txt", "Juggling/v_Juggling_g01_c01.avi 3\n"
               "YoYo/v_YoYo_g01_c01.avi 1\nv_YoYo_g03_c01.avi 2\nYoYo/v_YoYo_g04_c01.avi 2\n")
  with pytest.raises(ValueError, match=re.escape(
      f"{bad}:1: unknown class 'Juggling' (not in classInd.txt)")):
    ann_lib.parse("ucf101", lists, split="train", split_id=2)
  clips = ann_lib.parse("ucf101", lists, split="train", split_id=2, skip_bad_rows=True).clips
  assert [(c.id, c.source, c.error) for c in clips] == [
      ("v_YoYo_g04_c01", "trainlist02.txt:4", None),
      ("", "trainlist02.txt:1", "malformed row: unknown class 'Juggling' (not in classInd.txt)"),
      ("", "trainlist02.txt:2", "malformed row: label 1 is not that of class 'YoYo' (2 in "
       "classInd.txt)"),
      ("", "trainlist02.txt:3", "malformed row: expected '<Class>/<file>.avi [<label from 1>]', "
       "got 'v_YoYo_g03_c01.avi 2'")]
  _write(lists, "classInd.txt", "1 ApplyEyeMakeup\n3 YoYo\n")  # always fatal: labels would shift
  with pytest.raises(ValueError, match=r"classInd.txt: the indices must be 1..2; missing \[2\]"):
    ann_lib.parse("ucf101", lists, split="train", skip_bad_rows=True)
  with pytest.raises(ValueError, match="takes its classes from its annotations"):
    ann_lib.parse("ucf101", lists, split="train", classes=os.path.join(lists, "classInd.txt"))


# ------------------------------------------------------------------------------ THUMOS14
def test_thumos14_segments_per_video_and_bad_rows(tmp_path, sources):
  ann_dir = str(tmp_path / "annotation")
  _write(ann_dir, "BaseballPitch_val.txt",
         "video_validation_0000001 2.5 4.0\nvideo_validation_0000002  0.5  1.0 \n")
  _write(ann_dir, "CleanAndJerk_val.txt",
         "video_validation_0000001 72.8 76.4\nvideo_validation_0000001\t0.5\t1.25\n")
  _write(ann_dir, "Ambiguous_val.txt",
         "video_validation_0000001 5.0 6.0\nvideo_validation_0000003 1.0 2.0\n")
  _write(ann_dir, "BaseballPitch_test.txt", "video_test_0000001 1.0 2.0\n")
  root = str(tmp_path / "thumos")
  for v in ("video_validation_0000001", "video_validation_0000002"):
    _put(sources[".mp4"], root, f"{v}.mp4")

  ann = ann_lib.parse("thumos14", ann_dir, split="val")
  assert ann.classes == ["baseball pitch", "clean and jerk"]
  assert [(c.id, c.source) for c in ann.clips] == [
      ("video_validation_0000001", "BaseballPitch_val.txt:1"),
      ("video_validation_0000002", "BaseballPitch_val.txt:2")]  # the ambiguous-only one: none
  summary, clips, skipped = _ingest(ann, root, tmp_path / "out", "val")
  assert sorted(clips) == ["video_validation_0000001", "video_validation_0000002"]
  assert not skipped and summary["classes"] == ["baseball pitch", "clean and jerk"]
  v1, v2 = clips["video_validation_0000001"], clips["video_validation_0000002"]
  assert _segments(v1) == ([0.5, 2.5, F32(72.8)], [1.25, 4.0, F32(76.4)], [1, 0, 1])
  assert _labels(v1) == (None, None, ["clean and jerk, baseball pitch"])  # two classes
  assert _segments(v2) == ([0.5], [1.0], [0])
  assert _labels(v2) == (0, "baseball pitch", ["baseball pitch"])
  assert v1[records.NUM_FRAMES] == [2] and v1[records.START] == [0]  # the whole file
  test = ann_lib.parse("thumos14", ann_dir, split="test")
  assert [c.id for c in test.clips] == ["video_test_0000001"] and test.classes == [
      "baseball pitch"]

  # The reader's parse returns the segment fields (float32 seconds, int64 labels).
  ds = tf.data.TFRecordDataset(records.split_files(str(tmp_path / "out"), "val")).map(
      lambda s: records.parse_clip(s, context_keys=(records.VIDEO_ID,) + records.SEGMENT_KEYS))
  parsed = {x[records.VIDEO_ID].numpy().decode(): x for x in ds}
  p1 = parsed["video_validation_0000001"]
  assert p1[records.SEGMENT_START].dtype == tf.float32
  assert p1[records.SEGMENT_START].numpy().tolist() == [0.5, 2.5, F32(72.8)]
  assert p1[records.SEGMENT_END].numpy().tolist() == [1.25, 4.0, F32(76.4)]
  assert p1[records.SEGMENT_LABEL_INDEX].numpy().tolist() == [1, 0, 1]

  bad_dir = str(tmp_path / "bad")
  bad = _write(bad_dir, "HighJump_val.txt", "video_validation_0000002 3.0 2.0\n"
               "video_validation_0000002 x 2\nvideo_validation_0000002 0.25 0.75\n")
  with pytest.raises(ValueError, match=re.escape(f"{bad}:1: segment end 2 <= start 3;")):
    ann_lib.parse("thumos14", bad_dir, split="val")
  ann = ann_lib.parse("thumos14", bad_dir, split="val", skip_bad_rows=True)
  summary, clips, skipped = _ingest(ann, root, tmp_path / "out_bad", "val")
  assert _segments(clips["video_validation_0000002"]) == ([0.25], [0.75], [0])
  assert [(e["source"], e["reason"]) for e in skipped] == [
      ("HighJump_val.txt:1", "malformed row: segment end 2 <= start 3"),
      ("HighJump_val.txt:2", "malformed row: expected '<video name> <start s> <end s>', got "
       "'video_validation_0000002 x 2'")]
  assert summary["skipped_by_reason"] == {"malformed row": 2}


# --------------------------------------------------------------------------- ActivityNet
def test_activitynet_subsets_files_and_bad_entries(tmp_path, sources):
  db = {
      "abc": {"subset": "training", "duration": 1.0, "annotations": [
          {"segment": [1.5, 3.0], "label": "Zumba"}, {"segment": [0.25, 1.0], "label": "Archery"}]},
      "def": {"subset": "training", "duration": 1.0, "annotations": [
          {"segment": [0.5, 2.0], "label": "Zumba"}]},
      "ghi": {"subset": "training", "duration": 1.0, "annotations": []},
      "jkl": {"subset": "training", "duration": 1.0, "annotations": [
          {"segment": [0, 1], "label": "Archery"}]},
      "val1": {"subset": "validation", "duration": 1.0, "annotations": [
          {"segment": [0, 1], "label": "Baking cookies"}]},
      "tst": {"subset": "testing", "duration": 1.0, "annotations": []},
  }
  path = _write(str(tmp_path), "activity_net.v1-3.min.json",
                json.dumps({"version": "VERSION 1.3", "taxonomy": [], "database": db}))
  root = str(tmp_path / "anet")
  _put(sources[".mp4"], root, "v_abc.mp4")
  _put(sources[".mkv"], root, "def.mkv")  # no v_ prefix, another container
  _put(sources[".mp4"], root, "v_ghi.mp4")  # jkl's file is missing

  ann = ann_lib.parse("activitynet", path, split="training")
  assert ann.classes == ["Archery", "Baking cookies", "Zumba"]  # over the whole database
  summary, clips, skipped = _ingest(ann, root, tmp_path / "out", "train")
  assert sorted(clips) == ["abc", "def", "ghi"]
  assert _segments(clips["abc"]) == ([0.25, 1.5], [1.0, 3.0], [0, 2])
  assert _labels(clips["abc"]) == (None, None, ["Archery, Zumba"])
  assert _segments(clips["def"]) == ([0.5], [2.0], [2])
  assert _labels(clips["def"]) == (2, "Zumba", ["Zumba"])
  assert _segments(clips["ghi"]) == ([], [], [])  # annotated, without instances
  assert _labels(clips["ghi"]) == (None, None, ["ghi"])
  assert [(e["id"], e["source"], e["reason"].split(":")[0]) for e in skipped] == [
      ("jkl", "database.jkl", "missing file")]
  for split in ("validation", "val"):
    ann = ann_lib.parse("activitynet", path, split=split)
    assert [(c.id, c.segments, c.label_index) for c in ann.clips] == [
        ("val1", ((0.0, 1.0, 1),), 1)]
  with pytest.raises(ValueError, match="one of .*'training'.*got 'testing'"):
    ann_lib.parse("activitynet", path, split="testing")

  db["bad"] = {"subset": "training", "annotations": [
      {"segment": [2.0, 1.0], "label": "Zumba"}, {"segment": [1.0], "label": "Zumba"},
      {"segment": [0.5, 1.0], "label": "Zumba"}]}
  db["worse"] = ["not", "an", "object"]
  _write(str(tmp_path), "activity_net.v1-3.min.json", json.dumps({"database": db}))
  with pytest.raises(ValueError, match=re.escape(
      f"{path}: database.bad.annotations[0]: segment end 1 <= start 2;")):
    ann_lib.parse("activitynet", path, split="training")
  ann = ann_lib.parse("activitynet", path, split="training", skip_bad_rows=True)
  by_id = {c.id: c for c in ann.clips if c.id}
  assert by_id["bad"].segments == ((0.5, 1.0, 2),)
  assert [(c.source, c.error.split(",")[0]) for c in ann.clips if c.error] == [
      ("database.bad.annotations[0]", "malformed row: segment end 1 <= start 2"),
      ("database.bad.annotations[1]", "malformed row: expected {\"segment\": [start"),
      ("database.worse", "malformed row: a list")]


def test_segments_in_records_and_resume_digest():
  ex = records.clip_example("v", [b"jpeg"], ["c"], 2.0, segments=[(0.5, 1.0, 3)])
  d = records.example_to_dict(ex)
  assert _segments(d) == ([0.5], [1.0], [3])
  with pytest.raises(ValueError, match="bad segment"):
    records.clip_example("v", [b"jpeg"], ["c"], 2.0, segments=[(1.0, 1.0, 0)])
  assert records.SEGMENT_START not in records.example_to_dict(
      records.clip_example("v", [b"jpeg"], ["c"], 2.0))
  # Clips without segments or alternate names digest as a plain repr (resume checks stay
  # valid); segments and alternate names change the digest.
  c = ann_lib.Clip(id="a", video="a")
  assert "segments" not in repr(c) and "alt_videos" not in repr(c)
  digests = {run._digest([x]) for x in (c, dataclasses.replace(c, segments=((0.0, 1.0, 0),)),
                                        dataclasses.replace(c, alt_videos=("b",)))}
  assert len(digests) == 3
