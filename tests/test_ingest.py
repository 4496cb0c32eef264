"""Real-video ingestion: annotation parsers, PyAV decoding, sharded writing, resume, workers,
damaged files, the command line, and the tf.data pipeline reading the result."""
import io
import json
import os
import shutil
import subprocess
import sys

import av
import numpy as np
import pytest
from PIL import Image

from configs import alpro_pretrain
from vlp_jax.data import records, setup
from vlp_jax.data.ingest import annotations as ann_lib
from vlp_jax.data.ingest import decode, run
from vlp_jax.core.task import Stream

MIXED = Stream(image_mix=True)  # ALPRO's train stream: videos mixed with still images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SQ = 12  # side of the moving square, pixels
SIZE = 32  # short side of the stored frames in these tests


def _x0(i, n, width):
  """Left edge of the square in source frame i of n: it moves right across the frame."""
  return round(i * (width - SQ) / (n - 1))


def _write_video(path, codec, width, height, rate, n):
  with av.open(path, "w") as c:
    s = c.add_stream(codec, rate=rate)
    s.width, s.height, s.pix_fmt = width, height, "yuv420p"
    for i in range(n):
      img = np.full((height, width, 3), 30, np.uint8)
      x, y = _x0(i, n, width), height // 2 - SQ // 2
      img[y:y + SQ, x:x + SQ] = 230
      for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
        c.mux(p)
    for p in s.encode():
      c.mux(p)


def _cut(src, dst, fraction):
  with open(src, "rb") as f:
    data = f.read()
  with open(dst, "wb") as f:
    f.write(data[:int(len(data) * fraction)])


def _image(jpeg):
  return Image.open(io.BytesIO(jpeg))


def _center_x(jpeg):
  """Horizontal centre of the bright square, as a fraction of the frame width."""
  gray = np.asarray(_image(jpeg).convert("L"), np.float32)
  cols = np.nonzero(gray > 130)[1]
  return float(cols.mean() + 0.5) / gray.shape[1]


def _expected_x(t, rate, n, width):
  i = min(int(np.floor(t * rate + 0.5)), n - 1)  # source frame nearest to time t
  return (_x0(i, n, width) + SQ / 2) / width


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("videos"))
  _write_video(os.path.join(d, "right.mp4"), "libx264", 64, 48, 25, 50)  # 2 s, landscape
  _write_video(os.path.join(d, "portrait.webm"), "libvpx", 48, 64, 30, 60)  # 2 s, portrait
  _cut(os.path.join(d, "right.mp4"), os.path.join(d, "trunc.mp4"), 0.6)  # index at the end
  _cut(os.path.join(d, "portrait.webm"), os.path.join(d, "short.webm"), 0.3)
  _cut(os.path.join(d, "portrait.webm"), os.path.join(d, "partial.webm"), 0.85)
  with open(os.path.join(d, "garbage.mp4"), "wb") as f:
    f.write(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
  img = np.full((40, 80, 3), 30, np.uint8)
  img[14:26, 4:16] = 230
  Image.fromarray(img).save(os.path.join(d, "still.png"))
  return d


def _settings(videos, **kw):
  return decode.DecodeSettings(video_root=videos, **dict(dict(fps=4.0, short_side=SIZE), **kw))


def _clip(name, **kw):
  return ann_lib.Clip(id=name, video=name, **kw)


# ---------------------------------------------------------------------------------- decode
def test_decode_resamples_resizes_and_keeps_motion(videos):
  d = decode.decode_clip(_clip("right.mp4"), _settings(videos))
  assert len(d.frames) == 8 and d.fps == 4.0  # 2 s at 4 fps
  assert (d.start_us, d.end_us, d.partial) == (0, 2_000_000, None)
  assert {_image(f).size for f in d.frames} == {(43, SIZE)}  # 64x48 -> short side 32
  xs = [_center_x(f) for f in d.frames]
  assert all(b > a for a, b in zip(xs, xs[1:]))  # the square moves right
  for k, x in enumerate(xs):
    assert x == pytest.approx(_expected_x(k / 4, 25, 50, 64), abs=0.03)

  d = decode.decode_clip(_clip("right"), _settings(videos, fps=10.0))  # extension found
  assert len(d.frames) == 20 and d.path.endswith("right.mp4")
  d = decode.decode_clip(_clip("portrait.webm"), _settings(videos))
  assert len(d.frames) == 8 and {_image(f).size for f in d.frames} == {(SIZE, 43)}
  xs = [_center_x(f) for f in d.frames]
  for k, x in enumerate(xs):
    assert x == pytest.approx(_expected_x(k / 4, 30, 60, 48), abs=0.03)


def test_decode_segment_and_frame_cap(videos):
  d = decode.decode_clip(_clip("right.mp4", start=0.5, end=1.5), _settings(videos))
  assert (len(d.frames), d.start_us, d.end_us) == (4, 500_000, 1_500_000)
  for k, f in enumerate(d.frames):
    assert _center_x(f) == pytest.approx(_expected_x(0.5 + k / 4, 25, 50, 64), abs=0.03)
  # 20 frames at 10 fps exceed the cap: the rate drops to 2.5 fps, still spanning the clip.
  d = decode.decode_clip(_clip("right.mp4"), _settings(videos, fps=10.0, max_frames=5))
  assert (len(d.frames), d.fps, d.end_us) == (5, 2.5, 2_000_000)
  for k, f in enumerate(d.frames):
    assert _center_x(f) == pytest.approx(_expected_x(k / 2.5, 25, 50, 64), abs=0.03)
  with pytest.raises(decode.ClipError, match="segment starts at 2.5 s"):
    decode.decode_clip(_clip("right.mp4", start=2.5), _settings(videos))


def test_decode_damaged_files(videos):
  s = _settings(videos)
  for name, reason in [("trunc.mp4", "unreadable"), ("garbage.mp4", "unreadable"),
                       ("short.webm", "truncated"), ("nothere.mp4", "missing file")]:
    with pytest.raises(decode.ClipError, match=reason):
      decode.decode_clip(_clip(name), s)
  d = decode.decode_clip(_clip("partial.webm"), s)  # most of the file: kept, marked partial
  assert 4 <= len(d.frames) < 8 and d.end_us < 2_000_000 and "decoded" in d.partial
  with pytest.raises(decode.ClipError, match="truncated"):
    decode.decode_clip(_clip("partial.webm"), _settings(videos, min_coverage=0.99))
  assert decode.decode_job((_clip("garbage.mp4"), s)).startswith("unreadable")


def test_decode_still_image(videos):
  d = decode.decode_clip(ann_lib.Clip(id="i", video="still.png", still=True),
                         _settings(videos))
  assert len(d.frames) == 1 and d.fps == 0.0 and d.start_us is None
  assert _image(d.frames[0]).size == (64, SIZE)
  assert _center_x(d.frames[0]) == pytest.approx(10 / 80, abs=0.03)


# --------------------------------------------------------------------------------- parsers
def _write(tmp_path, name, text):
  path = str(tmp_path / name)
  with open(path, "w") as f:
    f.write(text)
  return path


def _lines(*objs):
  return "".join(json.dumps(o) + "\n" for o in objs)


def test_parse_webvid_and_cc3m(tmp_path):
  p = _write(tmp_path, "w2m.csv", "videoid,name,page_idx,page_dir,duration,contentUrl\n"
             "31353427,\"A dog, running\",0,001001_001050,PT00H00M15S,https://x/1.mp4\n"
             ",no video,0,001001_001050,PT00H00M15S,https://x/2.mp4\n")
  c = ann_lib.parse("webvid", p).clips
  assert c[0].id == "31353427" and c[0].captions == ("A dog, running",)
  assert c[0].paths()[:2] == ("001001_001050/31353427.mp4", "001001_001050/31353427.mp4.mp4")
  assert "31353427.mp4" in c[0].paths() and c[1].error == "row names no video"
  p = _write(tmp_path, "w10m.csv", "videoid,contentUrl,duration,page_dir,name\n"
             "7,https://x/7.mp4,PT00H00M09S,000001_000050,sunset over sea\n")
  assert ann_lib.parse("webvid", p).clips[0].paths()[0] == "000001_000050/7.mp4"

  p = _write(tmp_path, "cc.tsv", "caption\turl\na cat on a mat\thttp://h.com/a/cat.jpg?s=1\n"
             "just a caption\t\n\tdog.png\n")
  c = ann_lib.parse("cc3m", p).clips
  assert (c[0].id, c[0].paths()[:2], c[0].still, c[0].source) == (
      "cat.jpg", ("cat.jpg", "cat.jpg.jpg"), True, "line 2")
  assert c[1].error == "row names no image" and c[2].error == "row has no caption"


def test_parse_msrvtt_variants(tmp_path):
  p = _write(tmp_path, "train.jsonl", _lines({"caption": "a man sings", "clip_name": "video1"},
                                             {"caption": "a song", "clip_name": "video1"},
                                             {"caption": ["cars", "a race"], "video": "v2.mp4"}))
  c = ann_lib.parse("msrvtt", p).clips
  assert [(x.id, x.captions) for x in c] == [("video1", ("a man sings", "a song")),
                                             ("v2", ("cars", "a race"))]
  assert c[0].paths()[:2] == ("video1", "video1.mp4")
  orig = {"videos": [{"video_id": "video0", "split": "train"}, {"video_id": "video9"}],
          "sentences": [{"video_id": "video9", "caption": "b", "sen_id": 0},
                        {"video_id": "video0", "caption": "a", "sen_id": 1},
                        {"video_id": "video9", "caption": "c", "sen_id": 2}]}
  p = _write(tmp_path, "MSRVTT_data.json", json.dumps(orig))
  c = ann_lib.parse("msrvtt", p).clips
  assert [(x.id, x.captions) for x in c] == [("video0", ("a",)), ("video9", ("b", "c"))]
  keep = _write(tmp_path, "MSRVTT_train.9k.csv", "video_id\nvideo9\n")
  assert [x.id for x in ann_lib.parse("msrvtt", p, video_list=keep).clips] == ["video9"]
  p = _write(tmp_path, "test1k.csv", "key,vid_key,video_id,sentence\n"
             "ret0,msr7579,video7579,a girl is singing\nret1,msr7725,video7725,cooking\n")
  c = ann_lib.parse("msrvtt", p).clips
  assert [(x.id, x.captions) for x in c] == [("video7579", ("a girl is singing",)),
                                             ("video7725", ("cooking",))]


def test_parse_didemo_paragraphs(tmp_path):
  p = _write(tmp_path, "didemo.json", json.dumps([
      {"video": "a.mov", "description": "then it jumps", "times": [[2, 2], [2, 3]]},
      {"video": "a.mov", "description": "a dog walks", "times": [[0, 1]]},
      {"video": "b.mp4", "description": "only one", "times": [[1, 1]]},
      {"description": "no video here", "times": [[0, 0]]}]))
  c = ann_lib.parse("didemo", p).clips
  assert (c[0].id, c[0].captions) == ("a", ("a dog walks then it jumps",))
  assert c[0].paths()[:2] == ("a.mov", "a.mov.mp4") and "a.mp4" in c[0].paths()
  assert c[1].captions == ("only one",) and c[2].error == "row names no video"


def test_parse_qa(tmp_path):
  p = _write(tmp_path, "msrvtt_qa.json", json.dumps([
      {"question": "what is a man doing?", "answer": "sing", "video_id": 7, "id": 0},
      {"question": "who sings?", "answer": "man", "video_id": 7, "id": 1},
      {"question": "what is it?", "answer": "car", "video_id": "video8"}]))
  c = ann_lib.parse("msrvtt_qa", p).clips
  assert [(x.id, x.questions, x.answers) for x in c] == [
      ("video7", ("what is a man doing?", "who sings?"), ("sing", "man")),
      ("video8", ("what is it?",), ("car",))]
  assert c[0].captions == () and c[0].paths()[0] == "video7"
  p = _write(tmp_path, "msvd_qa.json", json.dumps([
      {"question": "who runs?", "answer": "man", "video_id": 1},
      {"question": "no answer", "video_id": 2}]))
  mapping = _write(tmp_path, "youtube_mapping.txt", "-4wsuPCjDBc_5_15 vid1\nabc_1_2 vid2\n")
  c = ann_lib.parse("msvd_qa", p, msvd_mapping=mapping).clips
  assert (c[0].id, c[0].paths()[:2]) == ("vid1", ("-4wsuPCjDBc_5_15", "-4wsuPCjDBc_5_15.mp4"))
  assert c[1].error == "row has no question or no answer"
  assert ann_lib.parse("msvd_qa", p).clips[0].paths()[0] == "vid1"


def test_parse_kinetics_and_jsonl(tmp_path):
  p = _write(tmp_path, "k400.csv", "label,youtube_id,time_start,time_end,split\n"
             "zumba,abc,10,20,train\n\"passing American football (in game)\",xyz,0,10,train\n"
             "abseiling,q,5.0,15.0,train\n")
  a = ann_lib.parse("kinetics", p)
  assert a.classes == ["abseiling", "passing American football (in game)", "zumba"]
  c = a.clips
  assert (c[0].id, c[0].label_index, c[0].label_text) == ("abc_000010_000020", 2, "zumba")
  assert "zumba/abc_000010_000020.mp4" in c[0].paths()
  assert "train/passing_American_football_(in_game)/xyz_000000_000010.mp4" in c[1].paths()
  assert (c[2].id, c[2].start) == ("q_000005_000015", None)  # files are already trimmed
  classes = _write(tmp_path, "classes.txt", "zumba\nabseiling\n")
  c = ann_lib.parse("kinetics", p, classes=classes).clips
  assert [x.label_index for x in c] == [0, None, 1] and "not in the class list" in c[1].error

  p = _write(tmp_path, "gen.jsonl", _lines(
      {"video": "a/b.mp4", "caption": "x", "label": 3, "start": 1, "end": 2.5},
      {"video": "c.jpg", "caption": ["y", "z"], "id": "img", "label": "cat"},
      {"video": "d", "question": ["q1", "q2"], "answer": ["a1", "a2"]},
      {"video": "e", "question": ["q1"], "answer": []},
      {"video": "f", "start": 3, "end": 2},
      {"caption": "nothing"}))
  a = ann_lib.parse("jsonl", p)
  c = a.clips
  assert a.classes == ["cat"]
  assert (c[0].id, c[0].label_index, c[0].label_text, c[0].start, c[0].end) == (
      "b_1_2.5", 3, None, 1.0, 2.5)
  assert (c[1].id, c[1].still, c[1].captions, c[1].label_index) == ("img", True, ("y", "z"), 0)
  assert c[2].questions == ("q1", "q2") and c[2].answers == ("a1", "a2") and not c[2].error
  assert "aligned" in c[3].error and "bad segment" in c[4].error
  assert c[5].error == "row names no video"


def test_parse_errors(tmp_path):
  with pytest.raises(ValueError, match="unknown annotation format 'youtube'"):
    ann_lib.parse("youtube", "x")
  with pytest.raises(FileNotFoundError, match="annotation file"):
    ann_lib.parse("msrvtt", str(tmp_path / "none.json"))
  p = _write(tmp_path, "bad.csv", "videoid,caption\n1,x\n")
  with pytest.raises(ValueError, match=r"missing column\(s\) \['name'\]"):
    ann_lib.parse("webvid", p)
  p = _write(tmp_path, "bad.jsonl", '{"video": "a"}\n{"video": \n')
  with pytest.raises(ValueError, match="line 2 is not valid JSON"):
    ann_lib.parse("jsonl", p)
  # --skip_bad_rows: malformed lines become skipped clips that name their line.
  p = _write(tmp_path, "bad2.jsonl", '{"video": "a", "caption": "x"}\n{"video": \n[1, 2]\n'
             '{"video": "b", "caption": "y"}\n')
  for fmt in ("jsonl", "msrvtt"):
    clips = ann_lib.parse(fmt, p, skip_bad_rows=True).clips
    good = [c for c in clips if not c.error]
    bad = sorted((c.source, c.error) for c in clips if c.error)
    assert len(good) == 2, fmt
    assert bad == [("line 2", "malformed row: not valid JSON (Expecting value)"),
                   ("line 3", "malformed row: a list, not a JSON object")], fmt


# ------------------------------------------------------------------------------ ingestion
ROWS = [
    {"video": "right.mp4", "caption": ["a white square moves right", "a box slides right"],
     "label": "moving right"},
    {"video": "portrait", "caption": "a tall video", "start": 0.5, "end": 1.5,
     "question": ["where does it go?", "what colour is it?"], "answer": ["right", "white"],
     "label": "moving right"},
    {"video": "still.png", "caption": "a still picture of a square", "id": "img1"},
    {"video": "partial.webm", "caption": "cut short", "label": "broken"},
    {"video": "trunc.mp4", "caption": "x"},
    {"video": "garbage.mp4", "caption": "y"},
    {"video": "missing.mp4", "caption": "z"},
    {"caption": "names no video"},
]
WRITTEN = ["right", "portrait_0.5_1.5", "img1", "partial"]


def _ingest(videos, tmp_path, out, **kw):
  path = str(tmp_path / "ann.jsonl")
  if not os.path.exists(path):
    _write(tmp_path, "ann.jsonl", _lines(*ROWS))
  ann = ann_lib.parse("jsonl", path)
  kw = dict(dict(num_shards=3, workers=0, progress=False, settings=_settings(videos)), **kw)
  return run.ingest(ann, out_dir=out, split="train", **kw)


def _shards(out):
  return [(os.path.basename(p), open(p, "rb").read())
          for p in records.split_files(out, "train")]


@pytest.fixture(scope="module")
def ingested(videos, tmp_path_factory):
  tmp = tmp_path_factory.mktemp("ingest")
  out = str(tmp / "out")
  return out, _ingest(videos, tmp, out, info=dict(format="jsonl"))


def test_ingest_records_reports_and_vocab(ingested):
  out, summary = ingested
  assert [n for n, _ in _shards(out)] == [f"train-0000{i}-of-00003.tfrecord" for i in range(3)]
  clips = {}
  for path in records.split_files(out, "train"):
    for r in records.read_records(path):
      ex = records.example_to_dict(r)
      clips[ex[records.VIDEO_ID][0].decode()] = ex
  assert sorted(clips) == sorted(WRITTEN)
  right = clips["right"]
  assert right[records.CAPTIONS] == [b"a white square moves right", b"a box slides right"]
  assert (right[records.NUM_FRAMES], right[records.FPS]) == ([8], [4.0])
  assert (right[records.START], right[records.END]) == ([0], [2_000_000])
  assert (right[records.LABEL_INDEX], right[records.LABEL_TEXT]) == ([1], [b"moving right"])
  xs = [_center_x(f) for f in right[records.FRAMES]]
  assert all(b > a for a, b in zip(xs, xs[1:]))
  seg = clips["portrait_0.5_1.5"]
  assert (seg[records.START], seg[records.END], seg[records.NUM_FRAMES]) == (
      [500_000], [1_500_000], [4])
  assert seg[records.QUESTIONS] == [b"where does it go?", b"what colour is it?"]
  assert seg[records.ANSWERS] == [b"right", b"white"]
  assert {_image(f).size for f in seg[records.FRAMES]} == {(SIZE, 43)}
  img = clips["img1"]
  assert img[records.NUM_FRAMES] == [1] and records.START not in img
  assert clips["partial"][records.LABEL_INDEX] == [0]

  with open(os.path.join(out, "skipped.jsonl")) as f:
    skipped = [json.loads(line) for line in f]
  assert [(e["index"], e["reason"].split(":")[0]) for e in skipped] == [
      (4, "unreadable"), (5, "unreadable"), (6, "missing file"), (7, "row names no video")]
  assert skipped[0]["video"].endswith("trunc.mp4") and skipped[0]["source"] == "line 5"
  with open(os.path.join(out, "partial.jsonl")) as f:
    assert [json.loads(line)["id"] for line in f] == ["partial"]
  assert (summary["clips"], summary["written"], summary["skipped"], summary["partial"]) == (
      8, 4, 4, 1)
  assert summary["skipped_by_reason"] == {"unreadable": 2, "missing file": 1,
                                          "row names no video": 1}
  assert summary["classes"] == ["broken", "moving right"]
  with open(os.path.join(out, "ingest.json")) as f:
    assert json.load(f)["splits"]["train"] == summary
  with open(os.path.join(out, "vocab.txt")) as f:
    vocab = f.read().split("\n")
  assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  assert {"square", "right", "where", "colour", "?"} <= set(vocab)


def test_workers_match_and_resume(videos, ingested, tmp_path):
  out, _ = ingested
  out2 = str(tmp_path / "out2")
  _ingest(videos, tmp_path, out2, workers=2)
  assert _shards(out2) == _shards(out)  # byte-identical for any number of workers

  files = records.split_files(out2, "train")
  mtimes = [os.stat(p).st_mtime_ns for p in files]
  os.remove(files[1])  # as if the run had stopped while writing shard 1
  summary = _ingest(videos, tmp_path, out2)
  assert summary["shards_resumed"] == 2 and summary["written"] == 4
  assert [os.stat(p).st_mtime_ns for p in (files[0], files[2])] == [mtimes[0], mtimes[2]]
  assert _shards(out2) == _shards(out)
  with open(os.path.join(out2, "skipped.jsonl")) as f:
    assert len(f.readlines()) == 4  # no duplicates after the rerun

  with pytest.raises(FileExistsError, match="different fps"):
    _ingest(videos, tmp_path, out2, settings=_settings(videos, fps=2.0))
  with pytest.raises(FileExistsError, match="different num_shards"):
    _ingest(videos, tmp_path, out2, num_shards=2)
  summary = _ingest(videos, tmp_path, out2, num_shards=2, overwrite=True)
  assert summary["shards_resumed"] == 0
  assert [n for n, _ in _shards(out2)] == [f"train-0000{i}-of-00002.tfrecord" for i in range(2)]


CRASHY = '''
import os
from vlp_jax.data.ingest import decode


def decode_or_die(job):
  if job[0].id == "boom":
    os._exit(3)  # what a decoder crash does to a worker process
  return decode.decode_job(job)
'''


def test_worker_crash_skips_the_clip(videos, tmp_path, monkeypatch):
  _write(tmp_path, "crashy_decode.py", CRASHY)
  monkeypatch.syspath_prepend(str(tmp_path))  # spawned workers inherit sys.path
  import crashy_decode
  clips = [ann_lib.Clip(id=i, video=p) for i, p in [
      ("right", "right.mp4"), ("boom", "right.mp4"), ("tall", "portrait.webm"),
      ("garbage", "garbage.mp4")]]
  summary = run.ingest(clips, out_dir=str(tmp_path / "out"), split="train", num_shards=2,
                       workers=2, settings=_settings(videos), progress=False,
                       decode_fn=crashy_decode.decode_or_die)
  assert (summary["written"], summary["skipped"]) == (2, 2)
  with open(tmp_path / "out" / "skipped.jsonl") as f:
    reasons = {e["id"]: e["reason"] for e in map(json.loads, f)}
  assert reasons["boom"] == run.WORKER_DIED and reasons["garbage"].startswith("unreadable")


HANGY = '''
import time
from vlp_jax.data.ingest import decode


def decode_or_hang(job):
  if job[0].id == "hang":
    time.sleep(3600)  # a decoder stuck on a pathological file
  return decode.decode_job(job)
'''


def test_hanging_worker_is_killed_and_its_clip_skipped(videos, tmp_path, monkeypatch):
  _write(tmp_path, "hangy_decode.py", HANGY)
  monkeypatch.syspath_prepend(str(tmp_path))
  import hangy_decode
  clips = [ann_lib.Clip(id=i, video=p) for i, p in [
      ("right", "right.mp4"), ("hang", "right.mp4"), ("tall", "portrait.webm")]]
  summary = run.ingest(clips, out_dir=str(tmp_path / "out"), split="train", num_shards=1,
                       workers=2, settings=_settings(videos), progress=False,
                       decode_fn=hangy_decode.decode_or_hang, worker_timeout=5.0)
  assert (summary["written"], summary["skipped"]) == (2, 1)
  with open(tmp_path / "out" / "skipped.jsonl") as f:
    reasons = {e["id"]: e["reason"] for e in map(json.loads, f)}
  assert reasons == {"hang": run.WORKER_TIMEOUT}


def test_command_line(videos, tmp_path):
  ann = _write(tmp_path, "test1k.csv", "key,vid_key,video_id,sentence\n"
               "ret0,msr0,right,a square moves right\nret1,msr1,lost,nothing\n")
  out = str(tmp_path / "cli")
  cmd = [sys.executable, "-m", "launch.ingest", "--format=msrvtt", f"--annotations={ann}",
         f"--video_root={videos}", "--split=test", f"--out={out}", "--num_shards=2",
         "--workers=0", "--fps=2", f"--short_side={SIZE}", "--noprogress"]
  res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert res.returncode == 0, res.stderr[-2000:]
  assert "1 of 2 clips written" in res.stdout and "missing file: 1" in res.stdout
  (ex,) = [records.example_to_dict(r) for p in records.split_files(out, "test")
           for r in records.read_records(p)]
  assert ex[records.VIDEO_ID] == [b"right"] and ex[records.NUM_FRAMES] == [4]

  res = subprocess.run(cmd[:-4] + ["--fps=0"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
  assert res.returncode != 0 and "--fps must be > 0" in res.stderr


def test_pipeline_reads_ingested_dir(videos, ingested, tmp_path):
  """The tf.data Loader trains on an ingested directory: video clips, plus a CC3M-style
  image split when the config mixes in still images."""
  d = str(tmp_path / "data")
  shutil.copytree(ingested[0], d)
  config = alpro_pretrain.get_config("tiny")
  config.data.dir = d
  config.data.synthetic.generate = False
  image_split = config.data.get("image_split", "images")
  tsv = _write(tmp_path, "cc.tsv", "a square on grey\tstill.png\nnothing\tnone.jpg\n")
  summary = run.ingest(ann_lib.parse("cc3m", tsv), out_dir=d, split=image_split, num_shards=1,
                       settings=_settings(videos), progress=False)
  assert (summary["written"], summary["skipped"], summary["vocab"]["source"]) == (
      1, 1, "existing")  # the train split's vocab.txt is kept: token ids stay valid
  with open(os.path.join(d, "skipped.jsonl")) as f:
    assert [json.loads(line)["split"] for line in f] == ["train"] * 4 + [image_split]

  assert setup.resolve_dir(config, workdir=str(tmp_path)) == d
  text = setup.text_info(config, d)
  batch = next(setup.stream_loader(config, d, text, MIXED, 4))
  n, t, size = 4, config.data.num_frames, config.data.image_size
  assert batch["video"].shape == (n, t, size, size, 3) and np.isfinite(batch["video"]).all()
  assert batch["text_ids"].shape == (n, config.data.max_text_len)
  assert (batch["text_mask"].sum(1) > 2).all()  # [CLS] caption words [SEP]
  seen = [v for b in setup.eval_loader(config, d, "train", text, 4)
          for v, ok in zip(b["video_id"], b["valid"]) if ok]
  assert sorted(v.decode() for v in seen) == sorted(WRITTEN)
