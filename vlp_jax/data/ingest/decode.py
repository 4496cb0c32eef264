"""Decodes one clip into JPEG frames at a fixed frame rate and short side (PyAV / Pillow).

Sampling: target times `start + k / fps` for every k with a target before the segment's end
(the whole file when the clip has no start/end); each target takes the decoded frame whose
timestamp is nearest (so the output rate does not depend on the source rate; a source slower
than `fps` repeats frames). `max_frames` caps the count: when the segment's duration is known
the rate is lowered to `max_frames / duration`, so the stored frames still span the whole
clip (ALPRO samples frames uniformly over the whole clip); when it is unknown the first
`max_frames` targets are kept. With a start time the decoder seeks to the keyframe before it
and stops after the end time.

Frames are resized so the short side is `short_side` (aspect kept; non-square pixels and the
rotation of the display matrix are applied), then JPEG-encoded.

Damaged files: a file that cannot be opened, has no video stream or yields no frame is
skipped (`ClipError`). When decoding stops early (a decode error, or the frames end more than
max(0.1 s, 1 / fps) before the duration the container declares), the frames decoded so far
are kept if they cover at least `min_coverage` of the segment: the clip is stored with its
real end time and reported as partial; otherwise it is skipped as truncated. (A container
that declares no per-stream duration, e.g. WebM, gives the longest stream's: a video track
shorter than its audio track is then reported as partial too, and kept.)

This module imports no tensorflow: it is what worker processes run.
"""
from __future__ import annotations

import dataclasses
import io
import math
import os

import av
import numpy as np
from PIL import Image, ImageOps

from vlp_jax.data.ingest.annotations import Clip


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
  """How clips are decoded (see the module docstring).

  Attributes:
    video_root: directory the clips' relative paths start from.
    fps: target frame rate (> 0).
    short_side: output short side in pixels.
    max_frames: most frames per clip.
    jpeg_quality: Pillow JPEG quality, 1..100.
    min_coverage: fraction of the segment a damaged video's decoded frames must cover to be
      kept (0 keeps any video with one decoded frame).
  """
  video_root: str
  fps: float = 2.0
  short_side: int = 256
  max_frames: int = 64
  jpeg_quality: int = 90
  min_coverage: float = 0.5

  def __post_init__(self):
    if not (self.fps > 0 and math.isfinite(self.fps)):
      raise ValueError(f"fps must be > 0, got {self.fps}")
    if self.short_side < 8:
      raise ValueError(f"short_side must be >= 8 pixels, got {self.short_side}")
    if self.max_frames < 1:
      raise ValueError(f"max_frames must be >= 1, got {self.max_frames}")
    if not 1 <= self.jpeg_quality <= 100:
      raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
    if not 0.0 <= self.min_coverage <= 1.0:
      raise ValueError(f"min_coverage must be in [0, 1], got {self.min_coverage}")


@dataclasses.dataclass
class Decoded:
  """One decoded clip.

  Attributes:
    frames: JPEG bytes, one per stored frame.
    fps: rate of the stored frames (lowered by `max_frames`; 0.0 for a still image).
    start_us, end_us: stored segment within the file, microseconds (None for a still image).
    path: the file that was read.
    partial: why fewer frames than the segment should have were kept, or None.
  """
  frames: list[bytes]
  fps: float
  start_us: int | None
  end_us: int | None
  path: str
  partial: str | None = None


class ClipError(Exception):
  """A clip that cannot be ingested; the message is the reason written to skipped.jsonl."""


def resolve(clip: Clip, video_root: str) -> str:
  """The first existing file among the clip's candidate paths.

  Raises:
    ClipError: none exists.
  """
  paths = clip.paths()
  if not paths:
    raise ClipError("row names no video")
  for p in paths:
    full = os.path.join(video_root, p)
    if os.path.isfile(full):
      return full
  others = f" (and {len(paths) - 1} other names)" if len(paths) > 1 else ""
  raise ClipError(f"missing file: {os.path.join(video_root, paths[0])}{others}")


def _out_size(width: float, height: float, short_side: int) -> tuple[int, int]:
  scale = short_side / min(width, height)
  return max(1, round(width * scale)), max(1, round(height * scale))


def _jpeg(rgb: np.ndarray, quality: int) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


class _FrameEncoder:
  """Resizes + encodes picked frames; a frame picked again reuses its JPEG."""

  def __init__(self, stream, settings: DecodeSettings):
    ctx = stream.codec_context
    sar = stream.sample_aspect_ratio or ctx.sample_aspect_ratio
    self.sar = float(sar) if sar and sar > 0 else 1.0
    self.settings = settings
    self._last = (None, b"")

  def __call__(self, frame) -> bytes:
    if self._last[0] is frame:
      return self._last[1]
    w, h = _out_size(frame.width * self.sar, frame.height, self.settings.short_side)
    interp = "AREA" if w < frame.width else "BICUBIC"
    rgb = frame.reformat(width=w, height=h, format="rgb24", interpolation=interp).to_ndarray()
    turns = round((frame.rotation or 0) / 90) % 4  # the display matrix rotates counterclockwise
    if turns:
      rgb = np.ascontiguousarray(np.rot90(rgb, k=turns))
    data = _jpeg(rgb, self.settings.jpeg_quality)
    self._last = (frame, data)
    return data


def _declared_end(container, stream) -> float | None:
  """End of the video stream in seconds (stream time), from the container's metadata."""
  tb = stream.time_base
  start = float(stream.start_time * tb) if stream.start_time is not None else 0.0
  if stream.duration and tb:
    return start + float(stream.duration * tb)
  if container.duration:
    c_start = container.start_time / av.time_base if container.start_time is not None else 0.0
    return c_start + container.duration / av.time_base
  return None


def decode_video(path: str, clip: Clip, s: DecodeSettings) -> Decoded:
  """Decodes `clip`'s segment of the video file `path` (see the module docstring)."""
  try:
    container = av.open(path, metadata_errors="ignore")
  except (av.error.FFmpegError, OSError, ValueError) as e:
    raise ClipError(f"unreadable: {type(e).__name__}: {e}") from None
  with container:
    if not container.streams.video:
      raise ClipError("unreadable: no video stream")
    stream = container.streams.video[0]
    tb = stream.time_base
    offset = float(stream.start_time * tb) if stream.start_time is not None and tb else 0.0
    declared_end = _declared_end(container, stream)
    seg_start = offset + (clip.start or 0.0)
    seg_end = offset + clip.end if clip.end is not None else declared_end
    if declared_end is not None and seg_end is not None:
      seg_end = min(seg_end, declared_end)
    if seg_end is not None and seg_end <= seg_start:
      raise ClipError(f"segment starts at {clip.start} s, the video ends at "
                      f"{seg_end - offset:.3f} s")
    span = None if seg_end is None else seg_end - seg_start
    fps = s.fps
    if span is not None and span * fps > s.max_frames:
      fps = s.max_frames / span  # keep the whole segment in max_frames frames
    count = s.max_frames if span is None else max(1, min(s.max_frames,
                                                           math.ceil(span * fps - 1e-6)))
    if clip.start and tb:
      try:
        container.seek(int(seg_start / tb), stream=stream, backward=True)
      except av.error.FFmpegError:
        pass  # decode from the beginning instead; frames before the start are passed over
    rate = float(stream.average_rate or stream.guessed_rate or fps)
    encode = _FrameEncoder(stream, s)
    frames: list[bytes] = []
    prev = prev_t = None
    last_dt = 1.0 / rate
    error = None
    try:
      for frame in container.decode(stream):
        t = frame.time
        if t is None:
          t = seg_start if prev_t is None else prev_t + 1.0 / rate
        if prev_t is not None:
          if t <= prev_t:
            continue  # out-of-order or duplicate timestamp
          last_dt = t - prev_t
        while len(frames) < count and seg_start + len(frames) / fps <= t:
          target = seg_start + len(frames) / fps
          use_prev = prev is not None and target - prev_t < t - target
          frames.append(encode(prev if use_prev else frame))
        prev, prev_t = frame, t
        if len(frames) >= count:
          break
    except (av.error.FFmpegError, OSError, ValueError) as e:
      error = f"{type(e).__name__}: {e}"
    if prev is None:
      raise ClipError("unreadable: no frame decoded" + (f" ({error})" if error else ""))
    decoded_end = prev_t + last_dt
    # Targets after the last frame's timestamp but within its display time take that frame.
    while len(frames) < count and seg_start + len(frames) / fps < decoded_end - 1e-6:
      frames.append(encode(prev))
    if not frames:
      raise ClipError(f"segment starts at {clip.start} s, after the last frame "
                      f"({prev_t - offset:.3f} s)")
    if len(frames) >= count:  # stopped once every target had its frame
      end = seg_start + count / fps if seg_end is None else seg_end
    else:
      end = decoded_end if seg_end is None else min(decoded_end, seg_end)
    partial = None
    short = span is not None and decoded_end < seg_end - max(0.1, 1.0 / fps)
    if len(frames) < count and (error or short):
      covered = max(0.0, end - seg_start)
      detail = f"decoded {covered:.2f} s of {span:.2f} s" if span else (
          f"decoded {covered:.2f} s")
      detail += f" ({error})" if error else ""
      if span and covered < s.min_coverage * span:
        raise ClipError(f"truncated: {detail}")
      partial = detail
    return Decoded(frames=frames, fps=fps, start_us=round((seg_start - offset) * 1e6),
                   end_us=round((end - offset) * 1e6), path=path, partial=partial)


def decode_image(path: str, s: DecodeSettings) -> Decoded:
  """A still image as a one-frame clip (EXIF orientation applied)."""
  try:
    with Image.open(path) as im:
      im = ImageOps.exif_transpose(im).convert("RGB")
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise ClipError(f"unreadable: {type(e).__name__}: {e}") from None
  size = _out_size(im.width, im.height, s.short_side)
  if size != im.size:
    im = im.resize(size, Image.BICUBIC, reducing_gap=3.0)
  return Decoded(frames=[_jpeg(np.asarray(im), s.jpeg_quality)], fps=0.0, start_us=None,
                 end_us=None, path=path)


def decode_clip(clip: Clip, s: DecodeSettings) -> Decoded:
  """Decodes one clip (video or still image).

  Raises:
    ClipError: the clip cannot be ingested (missing or unreadable file, truncated, ...).
  """
  if clip.error:
    raise ClipError(clip.error)
  path = resolve(clip, s.video_root)
  return decode_image(path, s) if clip.still else decode_video(path, clip, s)


def decode_job(job: tuple[Clip, DecodeSettings]) -> Decoded | str:
  """Worker entry point: the decoded clip, or the reason it was skipped (never raises)."""
  clip, settings = job
  try:
    return decode_clip(clip, settings)
  except ClipError as e:
    return str(e)
  except Exception as e:  # noqa: BLE001 - one bad file must not end the run
    return f"error: {type(e).__name__}: {e}"
