"""Annotation parsers: one function per dataset format, each returning `Clip` descriptions.

Every parser reads one annotation file (or a directory of split files) and returns
`Annotations(clips, classes)`. A row that cannot be used (it names no video, has no caption,
bad times, ...) still becomes a `Clip` with `error` set, so ingestion reports it in
`skipped.jsonl` instead of dropping it silently.
Video names are relative to `--video_root`; a name without an extension tries the common
video extensions (`.mp4`, `.webm`, `.avi`, `.mkv`, `.mov`, ...), a name with one also tries
`NAME.mp4` and `STEM.mp4` etc. (re-encoded copies), first existing file wins.

Formats (`--format`):

webvid     WebVid CSV with a header: WebVid-2M `videoid,name,page_idx,page_dir,duration,
           contentUrl`, WebVid-10M `videoid,contentUrl,duration,page_dir,name`. Caption =
           `name`; file `<page_dir>/<videoid>.mp4`, else `<videoid>.mp4`. Id = videoid.
cc3m       Conceptual-Captions-style TSV, no header (a first row starting `caption` is
           skipped): `caption <TAB> image`, where image is a path under the root or a URL whose
           basename is the file name. Each image is a one-frame clip. Id = the image path.
msrvtt     One of: (a) ALPRO/ClipBERT retrieval lists, JSON list or JSONL, entries
           `{"clip_name" | "video" | "video_id": "video7010", "caption": str or [str]}`;
           (b) the original `train_val_videodata.json` / `MSRVTT_data.json`
           `{"videos": [{"video_id": ...}], "sentences": [{"video_id", "caption"}]}`;
           (c) the 1k-A test CSV `key,vid_key,video_id,sentence`. All captions of a video go
           into one clip. Id = video name without extension.
didemo     DiDeMo JSON list or JSONL, entries `{"video", "description", "times": [[s, e], ...]}`
           (original release; times in 5-s segment indices) or `{"clip_name" | "video",
           "caption"}` (ALPRO). Paragraph-to-video retrieval: all sentences of a video, ordered
           by their earliest segment (then file order), joined with spaces into one caption.
msrvtt_qa  Open-ended QA, JSON list or JSONL of `{"question", "answer", "video_id" | "video"}`;
           an integer video_id `N` (original MSRVTT-QA) means file `videoN`. All questions of
           a video go into one clip as aligned question/answer lists (no caption).
msvd_qa    As msrvtt_qa; an integer video_id `N` means `vidN`. With `--msvd_mapping`
           (`youtube_mapping.txt`, lines `<youtube clip name> vidN`) the file is the YouTube
           clip name (e.g. `-4wsuPCjDBc_5_15.avi`), else the id itself.
kinetics   Kinetics CSV `label,youtube_id,time_start,time_end,split` (test files may lack
           `label`). File `<youtube_id>_<start:06d>_<end:06d>.mp4`, directly under the root or
           in a `<label>` / `<split>/<label>` folder (spaces also as `_`). The files are
           already trimmed to the segment, so the whole file is decoded. Label index = position
           in the sorted set of labels of the file (or in `--classes`), label text = label.
jsonl      Generic, one JSON object per line: `{"video": path, "caption": str or [str]}` plus
           optional `"id"`, `"label"` (int = index, str = class name, indexed like kinetics),
           `"question"`/`"answer"` (str or aligned lists), `"start"`/`"end"` (seconds: only
           that segment is decoded). A path with an image extension is a one-frame clip.


Action recognition and localisation. `--split` names the output files and also picks the
subset the files list; a malformed line, an unknown class or a segment with end <= start stops
the parse naming file:line (or file and JSON key), or with `--skip_bad_rows` is skipped and
listed with that place. The class list (index order) is stored as `Annotations.classes`.

hmdb51     `--annotations` = the directory of the official `<class>_test_split<k>.txt` files
           (lines `<video file> <0|1|2>`: 1 train, 2 test, 0 unused); `--split_id=k` (1-3),
           `--split=train|test`. Class = file name's class, `_` -> space ("brush hair"),
           index = sorted order; caption = label text = class. File `<class>/<file>` (or
           directly under the root). Id = file name without extension.
ucf101     `--annotations` = the directory of `classInd.txt` (`<index from 1> <ClassName>`),
           `trainlist0k.txt` (`<Class>/<file>.avi <index>`) and `testlist0k.txt`
           (`<Class>/<file>.avi`), with `--split_id=k`, `--split=train|test`; or one list
           file (classInd.txt beside it). Label index = classInd index - 1; class text =
           CamelCase as lower-case words ("ApplyEyeMakeup" -> "apply eye makeup") = caption.
           A class folder that differs from classInd.txt only in case still matches.
thumos14   Untrimmed videos: `--annotations` = the directory of the temporal annotation files
           `<Class>_val.txt` / `<Class>_test.txt` (lines `<video name> <start s> <end s>`),
           `--split=val|test`. Classes = the files' class names (`Ambiguous_*` left out),
           sorted; class text as for ucf101. One clip per video (sorted by name), the whole
           file decoded, with `segments` (start, end, label index) sorted by start; caption =
           its segments' distinct class texts in time order joined with ", " (the video id if
           it has none); label index / text only when all its segments have one class.
activitynet  ActivityNet-1.3 JSON `{"database": {id: {"subset", "duration", "annotations":
           [{"segment": [s, e], "label"}]}}}`, `--split=training|validation` (or train|val).
           Classes = sorted labels of the whole database; records as for thumos14 (a video
           without annotations: empty segment lists). File `v_<id>` (then `<id>`), any video
           extension (.mp4, .mkv, .webm, ...). Bad entries are named by JSON key, e.g.
           `database.<id>.annotations[2]`.

`--video_list` (any format) keeps only the clips whose id is listed: one id per line, or a CSV
with a `video_id` column (e.g. `MSRVTT_train.9k.csv`).
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import json
import math
import numbers
import os
import posixpath
import re
from typing import Any
from collections.abc import Callable, Iterable, Sequence
from urllib.parse import urlsplit

VIDEO_EXTS = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".3gp",
              ".wmv", ".ogv", ".gif")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


@dataclasses.dataclass(frozen=True, slots=True)  # slots: millions of rows stay small
class Clip:
  """One clip to ingest.

  Attributes:
    id: stored as `video/id`.
    video: the file name the annotation gives, relative to the video root (or absolute);
      "" when the row names none. `paths()` lists the names tried.
    dirs: folders (relative to the root) to look for it in, in order.
    captions, label_index, label_text, questions, answers: stored as the schema's fields.
    start, end: segment of the file in seconds (None = from the start / to the end).
    still: a still image (one-frame clip, decoded with PIL).
    source: where in the annotation file the clip comes from, e.g. "line 17".
    error: why the row cannot be ingested (reported as skipped, never decoded), or None.
    segments: annotated instances of an untrimmed video, ((start s, end s, label index), ...)
      sorted by start, stored as `segment/*`; None = not annotated with segments.
    alt_videos: further file names tried (after `video`, in the same `dirs`).
  """
  id: str
  video: str
  dirs: tuple[str, ...] = ("",)
  captions: tuple[str, ...] = ()
  label_index: int | None = None
  label_text: str | None = None
  questions: tuple[str, ...] | None = None
  answers: tuple[str, ...] | None = None
  start: float | None = None
  end: float | None = None
  still: bool = False
  source: str = ""
  error: str | None = None
  # Out of the repr, which `run._digest` hashes: clips without them keep their digest, so
  # the resume check of ingestions of the other formats is unaffected.
  segments: tuple[tuple[float, float, int], ...] | None = dataclasses.field(
      default=None, repr=False)
  alt_videos: tuple[str, ...] = dataclasses.field(default=(), repr=False)

  def paths(self) -> tuple[str, ...]:
    """Candidate files relative to the video root, in the order they are tried."""
    exts = IMAGE_EXTS if self.still else VIDEO_EXTS
    names = [p for v in (self.video, *self.alt_videos) for p in candidates(v, self.dirs, exts)]
    return tuple(dict.fromkeys(names))

  def texts(self) -> list[str]:
    """All text of the clip (captions, questions, answers, label), for the vocabulary."""
    out = list(self.captions) + list(self.questions or ()) + list(self.answers or ())
    return out + ([self.label_text] if self.label_text else [])


@dataclasses.dataclass
class Annotations:
  """Parsed annotation file: the clips, and the class names by label index (or None)."""
  clips: list[Clip]
  classes: list[str] | None = None


# --------------------------------------------------------------------------- file helpers
def _check_file(path: str, what: str = "annotation file") -> None:
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(f"{what} {path!r} not found")


def _read_text(path: str) -> str:
  _check_file(path)
  with open(path, encoding="utf-8-sig") as f:  # -sig: tolerate a byte-order mark
    return f.read()


def _json_items(path: str, bad_rows: list | None = None) -> list[tuple[str, Any]]:
  """(source, entry) pairs of a JSON list or a JSONL file (a JSON object is one entry).

  A line that is not JSON raises, or with a `bad_rows` list is appended there as
  (source, reason) and left out.
  """
  text = _read_text(path)
  try:
    data = json.loads(text)
  except json.JSONDecodeError:
    data = None
  if data is not None:
    if isinstance(data, list):
      return [(f"item {i}", e) for i, e in enumerate(data)]
    return [("file", data)]
  out = []
  for i, line in enumerate(text.splitlines()):
    if not line.strip():
      continue
    try:
      out.append((f"line {i + 1}", json.loads(line)))
    except json.JSONDecodeError as e:
      if bad_rows is None:
        raise ValueError(f"{path}: line {i + 1} is not valid JSON ({e.msg}); "
                         "--skip_bad_rows skips and lists such lines") from None
      bad_rows.append((f"line {i + 1}", f"not valid JSON ({e.msg})"))
  return out


def _dict_items(path: str, bad_rows: list | None = None) -> list[tuple[str, dict]]:
  """`_json_items` whose entries must be JSON objects (others raise, or go to `bad_rows`)."""
  items = []
  for source, e in _json_items(path, bad_rows):
    if isinstance(e, dict):
      items.append((source, e))
    elif bad_rows is None:
      raise ValueError(f"{path}: {source} is a {type(e).__name__}, expected a JSON object; "
                       "--skip_bad_rows skips and lists such rows")
    else:
      bad_rows.append((source, f"a {type(e).__name__}, not a JSON object"))
  return items


def _csv_rows(path: str, required: Sequence[str]) -> tuple[list[str], list[tuple[str, dict]]]:
  """(header, [(source, row dict)]) of a CSV file with a header row."""
  _check_file(path)
  with open(path, encoding="utf-8-sig", newline="") as f:
    reader = csv.DictReader(f)
    header = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    missing = [c for c in required if c not in header]
    if missing:
      raise ValueError(f"{path}: missing column(s) {missing}; the header has {header}")
    rows = [(f"line {reader.line_num}", {k: (v or "").strip() for k, v in r.items() if k})
            for r in reader]
  return header, rows


def _text(value) -> str:
  return "" if value is None else str(value).strip()


def _texts(value) -> list[str]:
  """A string or a list of strings -> non-empty stripped strings."""
  values = value if isinstance(value, (list, tuple)) else [value]
  return [t for t in (_text(v) for v in values) if t]


def _stem(name: str) -> str:
  base = posixpath.basename(name.replace("\\", "/"))
  root, ext = posixpath.splitext(base)
  return root if ext.lower() in VIDEO_EXTS + IMAGE_EXTS else base


def candidates(name: str, dirs: Sequence[str] = ("",), exts: Sequence[str] = VIDEO_EXTS
               ) -> tuple[str, ...]:
  """File names to try for `name` (relative to the root), in order, without duplicates."""
  if not name:
    return ()
  root, ext = os.path.splitext(name)
  names = [name] + [name + e for e in exts]
  if ext.lower() in VIDEO_EXTS + IMAGE_EXTS:
    names += [root + e for e in exts]
  out = [os.path.join(d, n) if d else n for d in dirs for n in names]
  return tuple(dict.fromkeys(out))


def _is_image(name: str) -> bool:
  return os.path.splitext(name)[1].lower() in IMAGE_EXTS


def _label_index(labels: Iterable[str], classes: Sequence[str] | None) -> tuple[list[str], dict]:
  names = list(classes) if classes is not None else sorted(set(labels))
  return names, {n: i for i, n in enumerate(names)}


def _grouped(items: Iterable[tuple[str, str, list[str]]], order: Sequence[str] = ()
             ) -> list[tuple[str, str, list[str]]]:
  """Groups (source, video name, texts) by video name in first-seen order (`order` first)."""
  groups: dict[str, list] = collections.OrderedDict((n, [None, []]) for n in order)
  for source, name, texts in items:
    g = groups.setdefault(name, [None, []])
    g[0] = g[0] or source
    g[1].extend(texts)
  return [(src or "videos list", name, texts) for name, (src, texts) in groups.items()]


def _no_video(source: str, what: str = "video") -> Clip:
  return Clip(id="", video="", source=source, error=f"row names no {what}")


# -------------------------------------------------------------------------------- parsers
def parse_webvid(path: str, **_) -> Annotations:
  _, rows = _csv_rows(path, required=("videoid", "name"))
  clips = []
  for source, r in rows:
    vid, caption, page_dir = r.get("videoid", ""), r.get("name", ""), r.get("page_dir", "")
    if not vid:
      clips.append(_no_video(source))
      continue
    clips.append(Clip(id=vid, video=f"{vid}.mp4", dirs=(page_dir, "") if page_dir else ("",),
                      captions=(caption,), source=source,
                      error=None if caption else "row has no caption"))
  return Annotations(clips)


def parse_cc3m(path: str, **_) -> Annotations:
  _check_file(path)
  with open(path, encoding="utf-8-sig", newline="") as f:
    rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
  clips = []
  for i, row in enumerate(rows):
    if i == 0 and row and row[0].strip().lower() == "caption":
      continue  # header
    if not any(c.strip() for c in row):
      continue
    source = f"line {i + 1}"
    caption = row[0].strip()
    image = row[1].strip() if len(row) > 1 else ""
    if "://" in image:  # a URL: the downloaded file is named after its basename
      image = posixpath.basename(urlsplit(image).path)
    if not image:
      clips.append(_no_video(source, "image"))
      continue
    clips.append(Clip(id=image, video=image, captions=(caption,), still=True, source=source,
                      error=None if caption else "row has no caption"))
  return Annotations(clips)


def _caption_clips(grouped: Iterable[tuple[str, str, list[str]]], join: bool = False
                   ) -> list[Clip]:
  clips = []
  for source, name, texts in grouped:
    if not name:
      clips.append(_no_video(source))
      continue
    captions = (" ".join(texts),) if join and texts else tuple(texts)
    clips.append(Clip(id=_stem(name), video=name, captions=captions, source=source,
                      error=None if captions else "video has no caption"))
  return clips


def _video_name(e: dict, *keys: str) -> str:
  for k in keys:
    if e.get(k) not in (None, ""):
      return _text(e[k])
  return ""


def parse_msrvtt(path: str, bad_rows: list | None = None, **_) -> Annotations:
  if path.lower().endswith(".csv"):
    _, rows = _csv_rows(path, required=("video_id", "sentence"))
    return Annotations(_caption_clips(_grouped(
        (src, r["video_id"], _texts(r["sentence"])) for src, r in rows)))
  # A first look for the original release; the rows are read (and bad ones listed) below.
  items = _json_items(path, None if bad_rows is None else [])
  if len(items) == 1 and isinstance(items[0][1], dict) and "sentences" in items[0][1]:
    data = items[0][1]  # original MSRVTT release
    order = [_text(v.get("video_id")) for v in data.get("videos", []) if isinstance(v, dict)]
    sentences = [(f"sentences[{i}]", s) for i, s in enumerate(data["sentences"])]
    return Annotations(_caption_clips(_grouped(
        ((src, _text(s.get("video_id")), _texts(s.get("caption"))) for src, s in sentences),
        order=[o for o in order if o])))
  entries = _dict_items(path, bad_rows)
  return Annotations(_caption_clips(_grouped(
      (src, _video_name(e, "clip_name", "video", "video_id"), _texts(e.get("caption")))
      for src, e in entries)))


def parse_didemo(path: str, bad_rows: list | None = None, **_) -> Annotations:
  groups: dict[str, list] = collections.OrderedDict()
  for n, (source, e) in enumerate(_dict_items(path, bad_rows)):
    name = _video_name(e, "video", "clip_name", "video_id")
    texts = _texts(e.get("description", e.get("caption")))
    starts = [t[0] for t in e.get("times") or [] if isinstance(t, (list, tuple)) and t
              and isinstance(t[0], numbers.Real)]
    key = (min(starts) if starts else float("inf"), n)
    g = groups.setdefault(name, [source, []])
    g[1].extend((key, t) for t in texts)
  grouped = [(src, name, [t for _, t in sorted(sents, key=lambda x: x[0])])
             for name, (src, sents) in groups.items()]
  return Annotations(_caption_clips(grouped, join=True))


def load_msvd_mapping(path: str) -> dict[str, str]:
  """`youtube_mapping.txt` (lines `<youtube clip name> vidN`) -> {"vidN": clip name}."""
  out = {}
  for i, line in enumerate(_read_text(path).splitlines()):
    parts = line.split()
    if not parts:
      continue
    if len(parts) != 2:
      raise ValueError(f"{path}: line {i + 1} is not '<clip name> <vid id>': {line!r}")
    out[parts[1]] = parts[0]
  return out


def _parse_qa(path: str, int_prefix: str, mapping: dict[str, str] | None,
              bad_rows: list | None = None) -> Annotations:
  groups: dict[str, list] = collections.OrderedDict()
  bad = []
  for source, e in _dict_items(path, bad_rows):
    vid = e.get("video_id", e.get("video", e.get("gif_name")))
    if isinstance(vid, numbers.Integral) and not isinstance(vid, bool):
      name = f"{int_prefix}{vid}"
    else:
      name = _text(vid)
    question, answer = _text(e.get("question")), _text(e.get("answer"))
    if not name:
      bad.append(_no_video(source))
    elif not question or not answer:
      bad.append(Clip(id=_stem(name), video=name, source=source,
                      error="row has no question or no answer"))
    else:
      g = groups.setdefault(_stem(name), [source, name, [], []])
      g[2].append(question)
      g[3].append(answer)
  clips = []
  for vid, (source, name, questions, answers) in groups.items():
    clips.append(Clip(id=vid, video=(mapping or {}).get(vid, name), questions=tuple(questions),
                      answers=tuple(answers), source=source))
  return Annotations(clips + bad)


def parse_msrvtt_qa(path: str, bad_rows: list | None = None, **_) -> Annotations:
  return _parse_qa(path, "video", None, bad_rows)


def parse_msvd_qa(path: str, msvd_mapping: str | None = None, bad_rows: list | None = None,
                  **_) -> Annotations:
  mapping = load_msvd_mapping(msvd_mapping) if msvd_mapping else None
  return _parse_qa(path, "vid", mapping, bad_rows)


def parse_kinetics(path: str, classes: Sequence[str] | None = None, **_) -> Annotations:
  header, rows = _csv_rows(path, required=("youtube_id", "time_start", "time_end"))
  has_label = "label" in header
  names, index = _label_index((r["label"] for _, r in rows if r.get("label")), classes)
  clips = []
  for source, r in rows:
    yid, label, split = r["youtube_id"], r.get("label", ""), r.get("split", "")
    if not yid:
      clips.append(_no_video(source))
      continue
    try:
      start, end = int(float(r["time_start"])), int(float(r["time_end"]))
    except ValueError:
      clips.append(Clip(id=yid, video=yid, source=source,
                        error=f"bad time_start/time_end {r['time_start']!r}/{r['time_end']!r}"))
      continue
    stem = f"{yid}_{start:06d}_{end:06d}"
    folders = list(dict.fromkeys([label, label.replace(" ", "_")])) if label else []
    dirs = tuple([""] + folders + [os.path.join(split, f) for f in folders if split])
    error = None
    if has_label and label and label not in index:
      error = f"label {label!r} not in the class list"
    clips.append(Clip(id=stem, video=stem, dirs=dirs,
                      label_index=index.get(label) if label else None,
                      label_text=label or None, source=source, error=error))
  return Annotations(clips, names if has_label else None)


def _seconds(e: dict, key: str) -> float | None:
  v = e.get(key)
  if v is None or v == "":
    return None
  if isinstance(v, bool) or not isinstance(v, (numbers.Real, str)):
    raise ValueError(f"{key} must be a number of seconds, got {v!r}")
  return float(v)


def parse_jsonl(path: str, classes: Sequence[str] | None = None, bad_rows: list | None = None,
                **_) -> Annotations:
  entries = _dict_items(path, bad_rows)
  names, index = _label_index(
      (e["label"] for _, e in entries if isinstance(e.get("label"), str) and e["label"]),
      classes)
  clips = []
  for source, e in entries:
    video = _video_name(e, "video")
    if not video:
      clips.append(_no_video(source))
      continue
    error = None
    try:
      start, end = _seconds(e, "start"), _seconds(e, "end")
    except ValueError as err:
      start = end = None
      error = str(err)
    if error is None and ((start is not None and start < 0) or
                          (end is not None and end <= (start or 0.0))):
      error = f"bad segment start={start} end={end}"
    default_id = _stem(video) + ("" if start is None and end is None
                                 else f"_{start or 0:g}_{'' if end is None else f'{end:g}'}")
    label = e.get("label")
    label_index = label_text = None
    if isinstance(label, numbers.Integral) and not isinstance(label, bool):
      label_index = int(label)
    elif isinstance(label, str) and label:
      label_text = label
      label_index = index.get(label)
      if label_index is None:
        error = error or f"label {label!r} not in the class list"
    questions = answers = None
    if "question" in e or "answer" in e:
      questions, answers = tuple(_texts(e.get("question"))), tuple(_texts(e.get("answer")))
      if len(questions) != len(answers) or not questions:
        error = error or "question and answer must be aligned and non-empty"
    still = _is_image(video)
    clips.append(Clip(id=_text(e.get("id")) or default_id, video=video,
                      captions=tuple(_texts(e.get("caption"))), label_index=label_index,
                      label_text=label_text, questions=questions, answers=answers,
                      start=start, end=end, still=still, source=source, error=error))
  return Annotations(clips, names if any(isinstance(e.get("label"), str) for _, e in entries)
                     else None)


# ------------------------------------------------ action recognition / localisation formats
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def camel_words(name: str) -> str:
  """A CamelCase class name as lower-case words: "ApplyEyeMakeup" -> "apply eye makeup"."""
  return " ".join(_CAMEL.sub(" ", name.replace("_", " ")).split()).lower()


def _check_dir(path: str, what: str) -> None:
  if not path or not os.path.isdir(path):
    raise FileNotFoundError(f"{what} {path!r} is not a directory")


def _bad_row(bad_rows: list | None, where: str, source: str, reason: str) -> None:
  """A row that cannot be used: raises ValueError naming `where` (file:line, or file: JSON
  key), or with a `bad_rows` list (--skip_bad_rows) appends (source, reason) to it."""
  if bad_rows is None:
    raise ValueError(f"{where}: {reason}; --skip_bad_rows skips and lists such rows")
  bad_rows.append((source, reason))


def _numbered_lines(path: str) -> list[tuple[int, list[str]]]:
  """(1-based line number, whitespace-separated fields) of the non-blank lines of a file."""
  return [(i + 1, line.split()) for i, line in enumerate(_read_text(path).splitlines())
          if line.strip()]


def _subset(fmt: str, split: str | None, choices: dict[str, str]) -> str:
  """The annotation subset `--split` names for `fmt`."""
  if split not in choices:
    raise ValueError(f"--format={fmt} reads the subset that --split names: one of "
                     f"{list(choices)}, got {split!r}")
  return choices[split]


def _check_split_id(fmt: str, split_id) -> None:
  if split_id not in (1, 2, 3):
    raise ValueError(f"--format={fmt}: --split_id must be 1, 2 or 3, got {split_id!r}")


def _files(directory: str, pattern: str, what: str) -> list[tuple[str, str]]:
  """Sorted (class name, file name) of the files in `directory` matching `pattern` (a regex
  with a `cls` group)."""
  _check_dir(directory, "annotation directory")
  regex = re.compile(pattern)
  out = sorted((m.group("cls"), name) for name in os.listdir(directory)
               if (m := regex.fullmatch(name)))
  if not out:
    raise FileNotFoundError(f"no {what} files in {directory!r}")
  return out


def _segment_problem(start: float, end: float) -> str | None:
  """Why (start, end) in seconds is not a usable segment, or None."""
  if not (math.isfinite(start) and math.isfinite(end)):
    return f"segment times must be finite, got {start:g} {end:g}"
  if start < 0:
    return f"segment starts before 0 s ({start:g})"
  if end <= start:
    return f"segment end {end:g} <= start {start:g}"
  return None


def _segment_clip(vid: str, video: str, source: str, segments: Iterable[tuple[float, float, int]],
                  texts: Sequence[str], alt_videos: tuple[str, ...] = ()) -> Clip:
  """One untrimmed video with its segments (see thumos14 in the module docstring)."""
  segments = tuple(sorted(segments))
  labels = list(dict.fromkeys(label for _, _, label in segments))  # distinct, in time order
  single = labels[0] if len(labels) == 1 else None
  return Clip(id=vid, video=video, alt_videos=alt_videos,
              captions=(", ".join(texts[i] for i in labels) or vid,), label_index=single,
              label_text=None if single is None else texts[single], segments=segments,
              source=source)


def parse_hmdb51(path: str, split: str | None = None, split_id: int = 1,
                 bad_rows: list | None = None, **_) -> Annotations:
  flag = {"train": "1", "test": "2"}[_subset("hmdb51", split, {"train": "train", "test": "test"})]
  _check_split_id("hmdb51", split_id)
  files = _files(path, rf"(?P<cls>.+)_test_split{split_id}\.txt",
                 f"HMDB51 split ('<class>_test_split{split_id}.txt')")
  text = {folder: folder.replace("_", " ").strip() for folder, _ in files}
  names, index = _label_index(text.values(), None)
  clips = []
  for folder, name in files:
    file_path = os.path.join(path, name)
    for lineno, fields in _numbered_lines(file_path):
      if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
        _bad_row(bad_rows, f"{file_path}:{lineno}", f"{name}:{lineno}",
                 f"expected '<video file> <0|1|2>', got {' '.join(fields)!r}")
        continue
      if fields[1] == flag:
        t = text[folder]
        clips.append(Clip(id=_stem(fields[0]), video=fields[0], dirs=(folder, ""),
                          captions=(t,), label_index=index[t], label_text=t,
                          source=f"{name}:{lineno}"))
  return Annotations(clips, names)


def _ucf_classes(path: str) -> list[str]:
  """classInd.txt (`<index from 1> <ClassName>` lines) -> class names by index - 1. A bad
  line always raises: it would shift every label."""
  by_index: dict[int, tuple[str, int]] = {}
  lines: dict[str, int] = {}
  for lineno, fields in _numbered_lines(path):
    if len(fields) != 2 or not fields[0].isdigit() or int(fields[0]) < 1:
      raise ValueError(f"{path}:{lineno}: expected '<index from 1> <ClassName>', got "
                       f"{' '.join(fields)!r}")
    i, name = int(fields[0]), fields[1]
    if i in by_index or name in lines:
      first = by_index[i][1] if i in by_index else lines[name]
      raise ValueError(f"{path}:{lineno}: index {i} or class {name!r} is already on line {first}")
    by_index[i], lines[name] = (name, lineno), lineno
  missing = sorted(set(range(1, len(by_index) + 1)) - set(by_index))
  if not by_index or missing:
    raise ValueError(f"{path}: the indices must be 1..{len(by_index)}; missing {missing}")
  return [by_index[i][0] for i in range(1, len(by_index) + 1)]


def parse_ucf101(path: str, split: str | None = None, split_id: int = 1,
                 bad_rows: list | None = None, **_) -> Annotations:
  kind = _subset("ucf101", split, {"train": "trainlist", "test": "testlist"})
  if os.path.isdir(path):
    _check_split_id("ucf101", split_id)
    list_path = os.path.join(path, f"{kind}{split_id:02d}.txt")
  else:
    list_path = path
  class_path = os.path.join(os.path.dirname(list_path), "classInd.txt")
  _check_file(class_path, "UCF101 class list")
  _check_file(list_path, "UCF101 split list")
  folders = _ucf_classes(class_path)
  texts = [camel_words(f) for f in folders]
  exact = {f: i for i, f in enumerate(folders)}
  folded = {f.lower(): i for i, f in enumerate(folders)}
  name = os.path.basename(list_path)
  clips = []
  for lineno, fields in _numbered_lines(list_path):
    where, source = f"{list_path}:{lineno}", f"{name}:{lineno}"
    folder, _, video = (fields[0] if fields else "").replace("\\", "/").rpartition("/")
    if (len(fields) not in (1, 2) or not folder or not video
        or (len(fields) == 2 and not fields[1].isdigit())):
      _bad_row(bad_rows, where, source, "expected '<Class>/<file>.avi [<label from 1>]', got "
               f"{' '.join(fields)!r}")
      continue
    i = exact.get(folder, folded.get(folder.lower()))
    if i is None:
      _bad_row(bad_rows, where, source, f"unknown class {folder!r} (not in classInd.txt)")
      continue
    if len(fields) == 2 and int(fields[1]) != i + 1:
      _bad_row(bad_rows, where, source, f"label {fields[1]} is not that of class {folder!r} "
               f"({i + 1} in classInd.txt)")
      continue
    clips.append(Clip(id=_stem(video), video=video,
                      dirs=tuple(dict.fromkeys((folder, folders[i], ""))),
                      captions=(texts[i],), label_index=i, label_text=texts[i], source=source))
  return Annotations(clips, texts)


def parse_thumos14(path: str, split: str | None = None, bad_rows: list | None = None,
                   **_) -> Annotations:
  subset = _subset("thumos14", split, {"val": "val", "validation": "val", "test": "test"})
  files = [(c, n) for c, n in _files(path, rf"(?P<cls>.+)_{subset}\.txt",
                                     f"THUMOS14 annotation ('<Class>_{subset}.txt')")
           if c.lower() != "ambiguous"]  # regions left out of the evaluation, not a class
  if not files:
    raise FileNotFoundError(f"no THUMOS14 class files '<Class>_{subset}.txt' in {path!r}")
  texts = [camel_words(c) for c, _ in files]
  videos: dict[str, list] = {}  # video name -> [source of its first segment, segments]
  for label, (_, name) in enumerate(files):
    file_path = os.path.join(path, name)
    for lineno, fields in _numbered_lines(file_path):
      where, source = f"{file_path}:{lineno}", f"{name}:{lineno}"
      try:
        if len(fields) != 3:
          raise ValueError
        start, end = float(fields[1]), float(fields[2])
      except ValueError:
        _bad_row(bad_rows, where, source, "expected '<video name> <start s> <end s>', got "
                 f"{' '.join(fields)!r}")
        continue
      problem = _segment_problem(start, end)
      if problem:
        _bad_row(bad_rows, where, source, problem)
        continue
      videos.setdefault(fields[0], [source, []])[1].append((start, end, label))
  clips = [_segment_clip(v, v, source, segs, texts) for v, (source, segs) in sorted(
      videos.items())]
  return Annotations(clips, texts)


def _is_number(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def parse_activitynet(path: str, split: str | None = None, bad_rows: list | None = None,
                      **_) -> Annotations:
  subset = _subset("activitynet", split, {"training": "training", "validation": "validation",
                                          "train": "training", "val": "validation"})
  try:
    data = json.loads(_read_text(path))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
  db = data.get("database") if isinstance(data, dict) else None
  if not isinstance(db, dict):
    raise ValueError(f"{path}: no \"database\" object (ActivityNet-1.3 JSON: {{\"database\": "
                     "{video id: {\"subset\", \"annotations\"}}})")

  def annotations(e) -> list:
    a = e.get("annotations") if isinstance(e, dict) else None
    return a if isinstance(a, list) else []

  names, index = _label_index(
      (a["label"].strip() for e in db.values() for a in annotations(e)
       if isinstance(a, dict) and isinstance(a.get("label"), str) and a["label"].strip()),
      None)
  clips = []
  for vid, e in db.items():
    key = f"database.{vid}"
    if not isinstance(e, dict):
      _bad_row(bad_rows, f"{path}: {key}", key, f"a {type(e).__name__}, not a JSON object")
      continue
    if e.get("subset") != subset:
      continue
    if not isinstance(e.get("annotations", []), list):
      _bad_row(bad_rows, f"{path}: {key}.annotations", f"{key}.annotations", "not a list")
      continue
    segments = []
    for i, a in enumerate(e.get("annotations", [])):
      akey = f"{key}.annotations[{i}]"
      seg = a.get("segment") if isinstance(a, dict) else None
      label = a.get("label") if isinstance(a, dict) else None
      if not (isinstance(seg, list) and len(seg) == 2 and all(map(_is_number, seg))
              and isinstance(label, str) and label.strip()):
        _bad_row(bad_rows, f"{path}: {akey}", akey,
                 f"expected {{\"segment\": [start, end], \"label\": name}}, got {a!r}"[:200])
        continue
      problem = _segment_problem(float(seg[0]), float(seg[1]))
      if problem:
        _bad_row(bad_rows, f"{path}: {akey}", akey, problem)
        continue
      segments.append((float(seg[0]), float(seg[1]), index[label.strip()]))
    clips.append(_segment_clip(vid, f"v_{vid}", key, segments, names, alt_videos=(vid,)))
  return Annotations(clips, names)


PARSERS: dict[str, Callable[..., Annotations]] = {
    "webvid": parse_webvid,
    "cc3m": parse_cc3m,
    "msrvtt": parse_msrvtt,
    "didemo": parse_didemo,
    "msrvtt_qa": parse_msrvtt_qa,
    "msvd_qa": parse_msvd_qa,
    "kinetics": parse_kinetics,
    "jsonl": parse_jsonl,
    "hmdb51": parse_hmdb51,
    "ucf101": parse_ucf101,
    "thumos14": parse_thumos14,
    "activitynet": parse_activitynet,
}
FORMATS = tuple(PARSERS)


def load_lines(path: str, what: str) -> list[str]:
  """Non-empty stripped lines of a text file (class list, ...)."""
  _check_file(path, what)
  with open(path, encoding="utf-8-sig") as f:
    return [line.strip() for line in f if line.strip()]


def load_video_list(path: str) -> set[str]:
  """Ids from one-id-per-line text or a CSV with a `video_id` column (extensions dropped)."""
  lines = load_lines(path, "video list")
  if lines and "video_id" in [h.strip() for h in lines[0].split(",")]:
    _, rows = _csv_rows(path, required=("video_id",))
    return {_stem(r["video_id"]) for _, r in rows if r["video_id"]}
  return {_stem(line.split(",")[0].strip()) for line in lines}


_OWN_CLASSES = ("hmdb51", "ucf101", "thumos14", "activitynet")


def parse(fmt: str, path: str, *, classes: str | None = None, msvd_mapping: str | None = None,
          video_list: str | None = None, skip_bad_rows: bool = False, split: str | None = None,
          split_id: int = 1) -> Annotations:
  """Parses an annotation file of format `fmt` (see the module docstring).

  Args:
    fmt: one of `FORMATS`.
    path: annotation file (a directory for hmdb51 / thumos14; either for ucf101).
    classes: optional class-list file (one name per line; line i = label index i) for
      `kinetics` / `jsonl` string labels; default: the sorted set of labels in the file.
    msvd_mapping: optional `youtube_mapping.txt` for `msvd_qa`.
    video_list: optional file of clip ids to keep.
    skip_bad_rows: a malformed row (a line of a JSON / JSONL file that is not JSON or not an
      object; for the action formats also an unknown class or a bad segment) becomes a clip
      with `error` (reported as skipped, with its place) instead of stopping the parse.
    split: the subset to read, for hmdb51 / ucf101 (`train`, `test`), thumos14 (`val`,
      `test`) and activitynet (`training`, `validation`, or `train`, `val`).
    split_id: the official split, 1-3, for hmdb51 / ucf101.

  Raises:
    ValueError: unknown format, or a file that is not in the format (names the file, line
      and what is missing).
    FileNotFoundError: a named file does not exist.
  """
  if fmt not in PARSERS:
    raise ValueError(f"unknown annotation format {fmt!r}; choose one of {list(FORMATS)}")
  if fmt in ("hmdb51", "thumos14"):
    _check_dir(path, "annotation directory")
  elif not (fmt == "ucf101" and os.path.isdir(path or "")):
    _check_file(path)
  if classes and fmt in _OWN_CLASSES:
    raise ValueError(f"--format={fmt} takes its classes from its annotations; drop --classes")
  class_names = load_lines(classes, "class list") if classes else None
  if msvd_mapping:
    _check_file(msvd_mapping, "MSVD mapping file")
  bad_rows = [] if skip_bad_rows else None
  ann = PARSERS[fmt](path, classes=class_names, msvd_mapping=msvd_mapping, bad_rows=bad_rows,
                     split=split, split_id=split_id)
  ann.clips += [Clip(id="", video="", source=source, error=f"malformed row: {reason}")
                for source, reason in bad_rows or ()]
  if video_list:
    keep = load_video_list(video_list)
    ann.clips = [c for c in ann.clips if c.id in keep or (c.error and not c.id)]
  return ann
