"""The synthetic "moving shapes" corpus as video files plus annotation files.

`synthetic.generate` writes the corpus straight into TFRecord shards; this module writes the
same clips (rendered by `synthetic.render_clip`, same seed, same per-clip rng, so the same
shapes, motions, captions and questions) as the files a real dataset comes as, so the real
ingestion tool (`python -m launch.ingest`) can turn them into a dataset. Layout of `out_dir`:

  videos/<video_id>.mp4      one per clip of the video splits (train, val, test, test_unseen):
                             H.264, yuv420p, `synthetic.FPS` frames per second, every frame of
                             the renderer (its JPEGs decoded); `num_frames / FPS` seconds long
  images/<video_id>.jpg      the still images of split `images` (the renderer's JPEGs as they
                             are), when `num_images` > 0
  <split>.jsonl              generic annotations (`--format=jsonl`), every split: per line
                             {"video", "id", "caption": [3 str], "label": label text,
                             "question": [str], "answer": [str]}
  msrvtt_<split>.jsonl       MSRVTT retrieval lists as ALPRO ships them (`--format=msrvtt`),
                             video splits: one {"clip_name", "caption"} per caption
  msrvtt_qa_<split>.json     MSRVTT-QA style JSON list (`--format=msrvtt_qa`), video splits:
                             one {"id", "video_id", "question", "answer"} per question
  classes.txt                the label texts, line i = label index i (`--classes`), so string
                             labels get the renderer's label indices in every split
  vocab.txt                  the synthetic corpus's vocabulary (`--vocab`; a vocabulary built
                             from the train split alone would lack the image captions' words)
  synthetic_videos.json      the parameters and counts, `"complete": true` once everything is
                             written (it also marks the directory as this module's to rewrite)

Frames go through H.264 with 4:2:0 chroma subsampling, so decoded pixels differ slightly from
the JPEG corpus (mean absolute difference ~5-6 of 255, mostly the fine background noise
and colour edges). yuv420p needs even frame sides: `image_size` must be even.

No tensorflow is imported here: worker processes stay light.
"""
from __future__ import annotations

import concurrent.futures
import io
import json
import multiprocessing
import os
import shlex
import time
from fractions import Fraction
from typing import Any

import av
import numpy as np
from PIL import Image
from tqdm import tqdm

from vlp_jax.data import synthetic, tokenizer

VIDEO_DIR = "videos"
IMAGE_DIR = "images"
CLASSES_FILE = "classes.txt"
VOCAB_FILE = "vocab.txt"
MARKER = "synthetic_videos.json"
CRF = 18  # x264 constant-rate factor: near-transparent; the 4:2:0 chroma loss dominates anyway


def video_path(out_dir: str, video_id: str) -> str:
  return os.path.join(out_dir, VIDEO_DIR, f"{video_id}.mp4")


def image_path(out_dir: str, video_id: str) -> str:
  return os.path.join(out_dir, IMAGE_DIR, f"{video_id}.jpg")


def decode_jpeg(data: bytes) -> np.ndarray:
  """RGB uint8 [H, W, 3] of one JPEG frame."""
  return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def write_mp4(path: str, frames: list[np.ndarray], fps: float, crf: int = CRF) -> None:
  """Encodes RGB uint8 frames [H, W, 3] (even H and W) as H.264 yuv420p at `fps` frames/s.

  Frame k is shown from k / fps for 1 / fps seconds, so the stream lasts len(frames) / fps
  seconds. The bytes are a function of the frames (one encoder thread, no macroblock tree);
  workers parallelise across clips.
  """
  if not frames:
    raise ValueError(f"no frames to write to {path!r}")
  h, w = frames[0].shape[:2]
  if h % 2 or w % 2:
    raise ValueError(f"yuv420p needs even frame sides, got {w}x{h}")
  tmp = path + ".tmp"
  with av.open(tmp, "w", format="mp4") as container:
    stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
    stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
    stream.thread_count = 1
    # With macroblock-tree rate control the bytes of these short clips varied from run to
    # run (depending on what else the process had loaded); without it they are reproducible.
    stream.options = {"crf": str(crf), "x264-params": "mbtree=0"}
    for frame in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  os.replace(tmp, path)


def _write_clip(job: tuple) -> dict[str, Any]:
  """Worker: renders one clip, writes its mp4 (or jpg) file, returns its annotation fields."""
  out_dir, seed, split, index, num_frames, image_size, heldout, crf = job
  image = split == synthetic.IMAGE_SPLIT
  clip = synthetic.render_clip(seed, split, index, 1 if image else num_frames, image_size,
                               heldout)
  if image:
    with open(image_path(out_dir, clip["video_id"]), "wb") as f:
      f.write(clip["frames"][0])
  else:
    write_mp4(video_path(out_dir, clip["video_id"]), [decode_jpeg(f) for f in clip["frames"]],
              synthetic.FPS, crf)
  return {k: v for k, v in clip.items() if k != "frames"}


def _jsonl_entry(clip: dict, split: str) -> dict:
  ext = ".jpg" if split == synthetic.IMAGE_SPLIT else ".mp4"
  entry = dict(video=clip["video_id"] + ext, id=clip["video_id"], caption=clip["captions"],
               label=clip["label_text"])
  if clip.get("questions"):
    entry.update(question=clip["questions"], answer=clip["answers"])
  return entry


def _write_lines(path: str, objs: list[dict]) -> None:
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.writelines(json.dumps(o) + "\n" for o in objs)
  os.replace(path + ".tmp", path)


def _write_annotations(out_dir: str, split: str, clips: list[dict]) -> list[str]:
  """Writes the split's annotation files; returns their names."""
  names = [f"{split}.jsonl"]
  _write_lines(os.path.join(out_dir, names[0]), [_jsonl_entry(c, split) for c in clips])
  if split == synthetic.IMAGE_SPLIT:
    return names
  names.append(f"msrvtt_{split}.jsonl")
  _write_lines(os.path.join(out_dir, names[-1]),
               [dict(clip_name=c["video_id"], caption=cap) for c in clips
                for cap in c["captions"]])
  qa = [(c["video_id"], q, a) for c in clips
        for q, a in zip(c.get("questions") or [], c.get("answers") or [])]
  if qa:
    names.append(f"msrvtt_qa_{split}.json")
    rows = [json.dumps(dict(id=i, video_id=v, question=q, answer=a))
            for i, (v, q, a) in enumerate(qa)]
    with open(os.path.join(out_dir, names[-1]), "w", encoding="utf-8") as f:
      f.write("[\n" + ",\n".join(rows) + "\n]\n")  # a JSON list, one question per line
  return names


def _check_out_dir(out_dir: str) -> None:
  """Refuses a non-empty directory that this module did not write (it replaces files)."""
  if not os.path.isdir(out_dir):
    return
  if os.listdir(out_dir) and not os.path.exists(os.path.join(out_dir, MARKER)):
    raise FileExistsError(f"{out_dir!r} is not empty and holds no {MARKER}: refusing to write "
                          "the synthetic videos into it; pass an empty or new directory")


def _remove_stale(folder: str, keep: set[str]) -> None:
  for name in os.listdir(folder):
    if name not in keep:
      os.remove(os.path.join(folder, name))


def write(out_dir: str, *, seed: int, num_train: int, num_val: int, num_test: int,
          num_test_unseen: int, num_frames: int, image_size: int, num_images: int = 0,
          workers: int = 0, crf: int = CRF, progress: bool = False) -> dict:
  """Renders the corpus and writes videos, images and annotation files (module docstring).

  Args:
    out_dir: output directory; new, empty, or written by this function before (its files
      are replaced and videos/images of clips no longer in the corpus removed).
    seed: corpus seed (as `synthetic.generate`: same seed, same clips).
    num_train, num_val, num_test, num_test_unseen: clips per video split (a split with 0
      clips gets no files).
    num_frames: frames per clip (>= 1); the videos last num_frames / `synthetic.FPS` s.
    image_size: frame side in pixels; even (yuv420p).
    num_images: still images of split `images`; 0 = no such split.
    workers: spawned processes rendering and encoding (0 = in this process).
    crf: x264 constant-rate factor (0 = lossless after the yuv420p conversion; default 18).
    progress: show a tqdm bar per split.

  Returns:
    Summary dict: `dir`, `counts` per split, `files` (annotation file names per split),
    `heldout_pairs`, `num_frames`, `image_size`, `fps`, `seconds`, `bytes` (of the media).

  Raises:
    ValueError: bad sizes (an odd `image_size` names the yuv420p constraint).
    FileExistsError: `out_dir` holds other files.
  """
  start = time.time()
  requested = dict(train=num_train, val=num_val, test=num_test, test_unseen=num_test_unseen)
  requested[synthetic.IMAGE_SPLIT] = num_images
  for name, n in requested.items():
    if n < 0:
      raise ValueError(f"number of {name} clips must be >= 0, got {n}")
  counts = {split: n for split, n in requested.items() if n > 0}
  if not counts:
    raise ValueError("no clips to write: every split has 0 clips")
  if num_frames < 1:
    raise ValueError(f"num_frames must be >= 1, got {num_frames}")
  if image_size < 8 or image_size % 2:
    raise ValueError(f"image_size must be even and >= 8 (H.264 yuv420p stores colour at half "
                     f"resolution, so frame sides must be even), got {image_size}")
  if not 0 <= crf <= 51:
    raise ValueError(f"crf must be in [0, 51], got {crf}")
  if workers < 0:
    raise ValueError(f"workers must be >= 0, got {workers}")
  _check_out_dir(out_dir)
  os.makedirs(os.path.join(out_dir, VIDEO_DIR), exist_ok=True)
  os.makedirs(os.path.join(out_dir, IMAGE_DIR), exist_ok=True)
  marker = os.path.join(out_dir, MARKER)
  params = dict(version=1, seed=int(seed), counts=counts, num_frames=int(num_frames),
                image_size=int(image_size), fps=synthetic.FPS, crf=int(crf))
  # A marker from the start: the directory is ours, but not a complete corpus yet.
  with open(marker, "w") as f:
    json.dump(dict(params, complete=False), f)

  heldout = synthetic.heldout_pairs(seed)
  pool = None
  if workers > 0:  # spawn: the caller may run TF / JAX threads, unsafe to fork
    pool = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"))
  files, written = {}, {VIDEO_DIR: set(), IMAGE_DIR: set()}
  try:
    for split, n in counts.items():
      jobs = [(out_dir, seed, split, i, num_frames, image_size, heldout, crf) for i in range(n)]
      results = pool.map(_write_clip, jobs, chunksize=16) if pool else map(_write_clip, jobs)
      clips = list(tqdm(results, total=n, desc=f"write {split}", unit="clip",
                        disable=not progress, dynamic_ncols=True))
      folder, ext = ((IMAGE_DIR, ".jpg") if split == synthetic.IMAGE_SPLIT
                     else (VIDEO_DIR, ".mp4"))
      written[folder].update(c["video_id"] + ext for c in clips)
      files[split] = _write_annotations(out_dir, split, clips)
  finally:
    if pool:
      pool.shutdown()
  for folder, keep in written.items():
    _remove_stale(os.path.join(out_dir, folder), keep)
  for split in requested:  # annotations of a split an earlier run had and this one has not
    if split not in counts:
      for name in (f"{split}.jsonl", f"msrvtt_{split}.jsonl", f"msrvtt_qa_{split}.json"):
        if os.path.exists(os.path.join(out_dir, name)):
          os.remove(os.path.join(out_dir, name))
  with open(os.path.join(out_dir, CLASSES_FILE), "w") as f:
    f.write("".join(synthetic.LABEL_TEXT[m] + "\n" for m in synthetic.MOTIONS))
  tokenizer.write_vocab(os.path.join(out_dir, VOCAB_FILE), tokenizer.synthetic_vocab_words())
  size = sum(os.path.getsize(os.path.join(out_dir, folder, name))
             for folder, names in written.items() for name in names)
  summary = dict(dir=out_dir, counts=counts, files=files,
                 heldout_pairs=[list(p) for p in heldout], num_frames=num_frames,
                 image_size=image_size, fps=synthetic.FPS, bytes=size,
                 seconds=round(time.time() - start, 2))
  with open(marker + ".tmp", "w") as f:
    json.dump(dict(params, complete=True, files=files, heldout_pairs=summary["heldout_pairs"]),
              f, indent=1, sort_keys=True)
  os.replace(marker + ".tmp", marker)
  return summary


def ingest_commands(summary: dict, data_dir: str, num_shards: int = 4) -> list[str]:
  """The `python -m launch.ingest` command lines that turn `write`'s output into a dataset.

  Args:
    summary: `write`'s return value.
    data_dir: the dataset directory the commands write (the configs' `data.dir`).
    num_shards: shard files per split.
  """
  d = summary["dir"]

  def q(*parts):
    return shlex.quote(os.path.join(*parts))

  out = []
  for split in summary["counts"]:
    root = IMAGE_DIR if split == synthetic.IMAGE_SPLIT else VIDEO_DIR
    out.append(
        f"python -m launch.ingest --format=jsonl --annotations={q(d, split + '.jsonl')} "
        f"--video_root={q(d, root)} --split={split} --out={shlex.quote(data_dir)} "
        f"--classes={q(d, CLASSES_FILE)} --vocab={q(d, VOCAB_FILE)} "
        f"--fps={summary['fps']:g} --short_side={summary['image_size']} "
        f"--num_shards={num_shards}")
  return out


def entities_command(summary: dict, data_dir: str) -> str:
  """The `python -m launch.entities` command writing PEM's entity list into `data_dir`.

  The captions' most frequent nouns are exactly the 8 shape names (the words "video",
  "photo", ... are media words the entity finder drops).
  """
  splits = [s for s in ("train", synthetic.IMAGE_SPLIT) if s in summary["counts"]]
  return (f"python -m launch.entities --source={shlex.quote(data_dir)} "
          f"--splits={','.join(splits)} --top_k={len(synthetic.SHAPES)}")


def format_summary(summary: dict, data_dir: str, num_shards: int = 4) -> str:
  """Human-readable report of `write`: counts, paths, and the ingest commands to run next."""
  d = summary["dir"]
  counts = ", ".join(f"{s} {n}" for s, n in summary["counts"].items())
  lines = [
      (f"wrote {sum(summary['counts'].values())} clips ({counts}) in "
       f"{summary['seconds']:.1f} s, {summary['bytes'] / 2**20:.1f} MiB of media"),
      (f"  videos: {os.path.join(d, VIDEO_DIR)}/<id>.mp4 ({summary['num_frames']} frames of "
       f"{summary['image_size']}x{summary['image_size']} px at {summary['fps']:g} fps, H.264)"),
  ]
  if synthetic.IMAGE_SPLIT in summary["counts"]:
    lines.append(f"  images: {os.path.join(d, IMAGE_DIR)}/<id>.jpg")
  for split, names in summary["files"].items():
    lines.append(f"  {split}: " + ", ".join(os.path.join(d, n) for n in names))
  lines.append("  classes, vocabulary: " + ", ".join(
      os.path.join(d, n) for n in (CLASSES_FILE, VOCAB_FILE)))
  lines.append("held-out (shape, colour) pairs of test_unseen: "
               + ", ".join(f"{c} {s}" for s, c in summary["heldout_pairs"]))
  lines.append("")
  lines.append(f"next, ingest every split into {data_dir} and list PEM's entities there:")
  lines += ingest_commands(summary, data_dir, num_shards)
  lines.append(entities_command(summary, data_dir))
  lines.append("then train with --config.data.dir=" + shlex.quote(data_dir)
               + " --config.data.synthetic.generate=False")
  return "\n".join(lines)
