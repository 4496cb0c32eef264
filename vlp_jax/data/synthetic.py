"""The synthetic "moving shapes" video-text corpus.

Each clip shows one (sometimes two) coloured shapes moving over a noisy background, with
several template captions naming shape, colour, size and motion. It is written in the real
record schema (records.py), so the whole pipeline, the demo training run and the retrieval /
QA / action evaluations run on it unchanged.

Properties the evaluations rely on:
- Deterministic from a seed: every clip uses its own rng seeded by (seed, split, index), so
  the output does not depend on the number of worker processes.
- Frame order matters: every motion has an opposite (left/right, up/down, grows/shrinks), so
  a model that ignores time cannot separate them.
- `test_unseen` holds single-object clips whose (shape, colour) pair never occurs in
  train/val/test (compositional generalisation).

This module imports no tensorflow at module level, so worker processes stay light.
"""
from __future__ import annotations

import io
import json
import math
import os
import time
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "ring")
COLOURS = {  # saturated and far apart, and far from the grey background
    "red": (220, 30, 30),
    "green": (40, 180, 40),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 200),
    "orange": (250, 140, 10),
    "cyan": (20, 210, 220),
    "pink": (250, 110, 190),
}
SIZES = ("small", "large")
MOTIONS = ("left", "right", "up", "down", "grows", "shrinks", "rotates", "still")
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up",
            "grows": "shrinks", "shrinks": "grows"}
LABEL_TEXT = {"left": "moving left", "right": "moving right", "up": "moving up",
              "down": "moving down", "grows": "growing", "shrinks": "shrinking",
              "rotates": "rotating", "still": "staying still"}
# What a clip's class label (`label_index` / `label_text`) names: `motion`, the first object's
# motion (8 classes, `LABEL_TEXT`); `colour_motion`, its colour and motion ("red moving left",
# 64 classes); `shape_motion`, its shape and motion ("circle moving left"; 61 classes:
# circles, rings and hexagons do not rotate). The compound ones are for protocols where part of
# a class name is something a frame-level model can see (open-set recognition).
# Labelling -> the attribute of the first object named before its motion (None: motion only).
_LABEL_PREFIX = {"motion": None, "colour_motion": "colour", "shape_motion": "shape"}
LABELINGS = tuple(_LABEL_PREFIX)
SPLITS = ("train", "val", "test", "test_unseen")
# Still images (one-frame clips of motionless shapes, captions without motion; CC3M-style) for
# mixed video + image-text pre-training. Written only when `num_images` > 0.
IMAGE_SPLIT = "images"
_SPLIT_CODE = {s: i for i, s in enumerate(SPLITS + (IMAGE_SPLIT,))}
# The entity vocabulary of PEM (one entity per line): the shape nouns, which are also each
# clip's `entity/string`.
ENTITIES_FILE = "entities.txt"
_ROUND_SHAPES = ("circle", "ring")
_NO_ROTATE = ("circle", "ring", "hexagon")  # rotation invisible (hexagon: nearly, at 64 px)
_SYMMETRY = {"square": 4, "cross": 4, "star": 5, "triangle": 3, "diamond": 2}
HELDOUT_FRACTION = 0.15
TWO_OBJECT_PROB = 0.25
FPS = 4.0

SIZE_WORDS = {"small": ("small", "tiny", "little"), "large": ("large", "big", "huge")}
# (finite verb phrase, participle phrase) synonyms per motion. No phrase uses a word of
# another motion or a size word, so captions stay unambiguous.
MOTION_PHRASES = {
    "left": (("moves to the left", "moves left", "slides left", "slides to the left",
              "travels leftward", "drifts to the left"),
             ("moving to the left", "moving left", "sliding left", "drifting to the left",
              "travelling leftward")),
    "right": (("moves to the right", "moves right", "slides right", "slides to the right",
               "travels rightward", "drifts to the right"),
              ("moving to the right", "moving right", "sliding right", "drifting to the right",
               "travelling rightward")),
    "up": (("moves up", "rises", "moves upward", "floats up", "goes up", "slides up"),
           ("moving up", "rising", "floating upward", "going up")),
    "down": (("moves down", "falls", "sinks", "moves downward", "goes down", "slides down"),
             ("moving down", "falling", "sinking", "going down")),
    "grows": (("grows", "gets bigger", "expands", "is growing", "swells"),
              ("growing", "getting bigger", "expanding")),
    "shrinks": (("shrinks", "gets smaller", "contracts", "is shrinking"),
                ("shrinking", "getting smaller", "contracting")),
    "rotates": (("rotates", "spins", "is spinning", "turns around", "is rotating"),
                ("rotating", "spinning", "turning around")),
    "still": (("stays still", "does not move", "remains in place", "is standing still",
               "stays in place"),
              ("staying still", "not moving", "standing still", "resting in place")),
}
# Word rewrites that turn every motion phrase above into one of the opposite motion (a clip
# played backwards): data.reverse_twins' default table. Directed pairs; a word without a
# one-word opposite maps to a synonym of it ("swells" -> "shrinks").
REVERSED_WORDS = (
    ("left", "right"), ("right", "left"), ("leftward", "rightward"),
    ("rightward", "leftward"), ("up", "down"), ("down", "up"), ("upward", "downward"),
    ("downward", "upward"), ("rises", "falls"), ("falls", "rises"), ("rising", "falling"),
    ("falling", "rising"), ("sinks", "rises"), ("sinking", "rising"), ("grows", "shrinks"),
    ("shrinks", "grows"), ("growing", "shrinking"), ("shrinking", "growing"),
    ("bigger", "smaller"), ("smaller", "bigger"), ("expands", "contracts"),
    ("contracts", "expands"), ("expanding", "contracting"), ("contracting", "expanding"),
    ("swells", "shrinks"),
)

# {np} = "a small red circle", {verb} / {part} = motion phrases.
_SINGLE_TEMPLATES = (
    "{np} {verb}",
    "the {size} {colour} {shape} {verb}",
    "there is {np} {part}",
    "a video of {np} {part}",
    "{a_size} {shape} in {colour} {verb}",
    "we see {np} {part}",
    "one {size} {colour} {shape} {verb}",
)
_DOUBLE_TEMPLATES = (
    "two shapes: {np1} {part1} and {np2} {part2}",
    "{np1} {verb1} while {np2} {verb2}",
    "there are two shapes, {np1} {part1} and {np2} {part2}",
    "{np1} {verb1} and {np2} {verb2}",
    "{np1} {part1} next to {np2} {part2}",
)
_IMAGE_SINGLE_TEMPLATES = (
    "{np}",
    "a photo of {np}",
    "a picture of {np}",
    "an image of {np}",
    "there is {np}",
    "{a_size} {shape} in {colour}",
    "one {size} {colour} {shape}",
)
_IMAGE_DOUBLE_TEMPLATES = (
    "{np1} and {np2}",
    "a photo of {np1} and {np2}",
    "two shapes: {np1} and {np2}",
    "{np1} next to {np2}",
    "a picture of {np1} next to {np2}",
)
CAPTIONS_PER_CLIP = 3
# Where a still image's single shape is (thirds of the frame), appended to its captions: a
# CLIP trained on the stills then learns position (slowly: after ~1,500 of the demo's steps),
# which is what tells "moving left" from "moving right" once its frame features are ordered in
# time (Prompt-CLIP's lab).
_LOCATION_ROWS = ("top", None, "bottom")
_LOCATION_COLUMNS = ("left", None, "right")


def location_phrase(cx: float, cy: float, image_size: int) -> str:
  """"in the top left corner", "at the top", "on the left", "in the centre", ... of a point
  (pixels) by the thirds of an image_size frame."""
  col = _LOCATION_COLUMNS[min(int(3 * cx / image_size), 2)]
  row = _LOCATION_ROWS[min(int(3 * cy / image_size), 2)]
  if row and col:
    return f"in the {row} {col} corner"
  if row:
    return f"at the {row}"
  return f"on the {col}" if col else "in the centre"
# Question templates; {verb} is a finite motion phrase. Each is asked only when its answer is
# unambiguous for the clip (e.g. "the shape that moves left" with one leftward shape).
# "what object ..." has a colour-shape answer ("red circle"): ~56 rare answers, so a small
# answer vocabulary leaves some test answers out of vocabulary (and every `test_unseen` one).
_QA_TEMPLATES = {
    "colour_of_shape": "what colour is the {shape}?",
    "size": "what size is the {colour} {shape}?",
    "direction": "which way does the {colour} {shape} move?",
    "action": "what does the {colour} {shape} do?",
    "shape_of_colour": "what shape is {colour}?",
    "colour_of_mover": "what colour is the shape that {verb}?",
    "shape_of_mover": "what shape {verb}?",
    "count": "how many shapes are there?",
    "object_of_mover": "what object {verb}?",
}
QUESTIONS_PER_CLIP = 4
# Answers of "what does the ... do?" (non-directional motions).
ACTION_ANSWERS = {"grows": "grows", "shrinks": "shrinks", "rotates": "rotates",
                  "still": "still"}
COUNT_WORDS = {1: "one", 2: "two"}  # answers of "how many shapes are there?"

_SIZE_FRAC = {"small": 0.09, "large": 0.17}  # bounding radius / image size
_SCALE_RANGE = (0.6, 1.4)  # radius factor over a grows / shrinks clip
_TRAVEL = 0.4  # translation over the clip, fraction of the frame
# Total rotation over a clip, in symmetry periods: well away from a full period so the
# first and last frames differ, and small per frame so subsampled frames do not alias.
_ROTATION_PERIODS = 0.75
_SUPERSAMPLE = 4  # masks are drawn larger and box-filtered down: anti-aliased edges


def caption_words() -> list[str]:
  """All words (and punctuation) the captions, questions, answers and label texts can contain."""
  text = " ".join(
      list(_SINGLE_TEMPLATES) + list(_DOUBLE_TEMPLATES) + list(_QA_TEMPLATES.values())
      + list(_IMAGE_SINGLE_TEMPLATES) + list(_IMAGE_DOUBLE_TEMPLATES)
      + list(ACTION_ANSWERS.values()) + list(COUNT_WORDS.values()) + list(SHAPES) + list(COLOURS)
      + [w for ws in SIZE_WORDS.values() for w in ws] + list(LABEL_TEXT.values())
      + [p for vs in MOTION_PHRASES.values() for group in vs for p in group] + ["a", "an"]
      + ["in the top left corner at the bottom on the centre"])
  for ch in "{}:,?":
    text = text.replace(ch, f" {ch} ")
  words = [w for w in text.split() if w not in "{}" and w.isalpha() or w in (":", ",")]
  placeholders = {"np", "verb", "part", "size", "colour", "shape", "a_size", "np1", "np2",
                  "verb1", "verb2", "part1", "part2"}
  return list(dict.fromkeys(w for w in words if w not in placeholders))


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def heldout_pairs(seed: int) -> list[tuple[str, str]]:
  """The (shape, colour) pairs reserved for `test_unseen`, fixed by the seed.

  About 15 % of all pairs; no shape or colour is held out more than twice, so every shape
  and every colour still occurs in training.
  """
  rng = np.random.default_rng([seed, 7919])
  pairs = [(s, c) for s in SHAPES for c in COLOURS]
  k = max(1, round(HELDOUT_FRACTION * len(pairs)))
  while True:
    pick = [pairs[i] for i in sorted(rng.choice(len(pairs), size=k, replace=False))]
    shape_counts = np.unique([p[0] for p in pick], return_counts=True)[1]
    colour_counts = np.unique([p[1] for p in pick], return_counts=True)[1]
    if shape_counts.max() <= 2 and colour_counts.max() <= 2:
      return pick


def _sample_motion(rng: np.random.Generator, shape: str) -> str:
  choices = [m for m in MOTIONS if not (m == "rotates" and shape in _NO_ROTATE)]
  return choices[rng.integers(len(choices))]


def _track(rng: np.random.Generator, obj: dict, image_size: int) -> dict:
  """Random start so the shape stays fully in frame over the whole clip."""
  w = float(image_size)
  r = _SIZE_FRAC[obj["size"]] * w
  r_max = r * (_SCALE_RANGE[1] if obj["motion"] in ("grows", "shrinks") else 1.0)
  dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}.get(
      obj["motion"], (0, 0))
  dx, dy = dx * _TRAVEL * w, dy * _TRAVEL * w
  lo, hi = r_max + 1.0, w - r_max - 1.0
  x0 = rng.uniform(lo - min(dx, 0.0), hi - max(dx, 0.0))
  y0 = rng.uniform(lo - min(dy, 0.0), hi - max(dy, 0.0))
  angle0 = rng.uniform(-0.15, 0.15)  # small jitter keeps squares square, diamonds diamonds
  spin = 0.0
  if obj["motion"] == "rotates":
    period = 2 * math.pi / _SYMMETRY[obj["shape"]]
    spin = (1 if rng.random() < 0.5 else -1) * _ROTATION_PERIODS * period
  return dict(x0=x0, y0=y0, dx=dx, dy=dy, r=r, angle0=angle0, spin=spin)


def _pose(track: dict, motion: str, t: float) -> tuple[float, float, float, float]:
  """(cx, cy, radius, angle) at clip time t in [0, 1]."""
  lo, hi = _SCALE_RANGE
  scale = {"grows": lo + (hi - lo) * t, "shrinks": hi - (hi - lo) * t}.get(motion, 1.0)
  return (track["x0"] + track["dx"] * t, track["y0"] + track["dy"] * t, track["r"] * scale,
          track["angle0"] + track["spin"] * t)


def _unit_polygon(shape: str) -> np.ndarray:
  """Vertices [K, 2] of a shape of bounding radius 1, upright."""
  def ring(k, radius=1.0, offset=-math.pi / 2):
    a = offset + 2 * math.pi * np.arange(k) / k
    return np.stack([np.cos(a), np.sin(a)], -1) * radius
  if shape == "square":
    return ring(4, offset=math.pi / 4)
  if shape == "triangle":
    return ring(3)
  if shape == "hexagon":
    return ring(6, offset=0.0)
  if shape == "diamond":
    return np.array([[0.0, -1.0], [0.6, 0.0], [0.0, 1.0], [-0.6, 0.0]])
  if shape == "star":
    pts = ring(10)
    pts[1::2] *= 0.45
    return pts
  if shape == "cross":
    a, b = 0.32, 0.95
    return np.array([[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a], [a, b], [-a, b],
                     [-a, a], [-b, a], [-b, -a], [-a, -a]])
  raise ValueError(shape)


def _shape_mask(shape: str, cx: float, cy: float, r: float, angle: float,
                image_size: int) -> Image.Image:
  """Anti-aliased 'L' mask of one shape."""
  s = _SUPERSAMPLE
  big = Image.new("L", (image_size * s, image_size * s), 0)
  draw = ImageDraw.Draw(big)
  cx, cy, r = cx * s, cy * s, r * s
  if shape in _ROUND_SHAPES:
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    if shape == "ring":
      ri = 0.55 * r
      draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
  else:
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    pts = _unit_polygon(shape) @ rot.T * r + np.array([cx, cy])
    draw.polygon([tuple(p) for p in pts], fill=255)
  return big.reduce(s)


def _background(rng: np.random.Generator, image_size: int) -> np.ndarray:
  """Grey noise texture, different per clip: float32 [H, W, 3]."""
  base = rng.uniform(70.0, 150.0)
  low = rng.uniform(-30.0, 30.0, (4, 4)).astype(np.float32)
  low = np.asarray(Image.fromarray(low).resize((image_size, image_size),
                                                          Image.BILINEAR))
  tint = rng.uniform(-10.0, 10.0, 3).astype(np.float32)
  fine = rng.normal(0.0, 8.0, (image_size, image_size, 3)).astype(np.float32)
  return base + low[..., None] + tint + fine


def _noun_phrase(rng, obj) -> dict:
  size = SIZE_WORDS[obj["size"]][rng.integers(len(SIZE_WORDS[obj["size"]]))]
  verbs, parts = MOTION_PHRASES[obj["motion"]]
  return dict(size=size, colour=obj["colour"], shape=obj["shape"],
              np=f"{_article(size)} {size} {obj['colour']} {obj['shape']}",
              a_size=f"{_article(size)} {size}",
              verb=verbs[rng.integers(len(verbs))], part=parts[rng.integers(len(parts))])


def _captions(rng: np.random.Generator, objects: list[dict], image: bool = False) -> list[str]:
  single, double = ((_IMAGE_SINGLE_TEMPLATES, _IMAGE_DOUBLE_TEMPLATES) if image
                    else (_SINGLE_TEMPLATES, _DOUBLE_TEMPLATES))
  templates = single if len(objects) == 1 else double
  picks = rng.choice(len(templates), size=CAPTIONS_PER_CLIP, replace=False)
  out = []
  for k in picks:
    fields = {}
    if len(objects) == 1:
      fields = _noun_phrase(rng, objects[0])
    else:
      for j, obj in enumerate(objects, 1):
        fields.update({f"{key}{j}": v for key, v in _noun_phrase(rng, obj).items()})
    out.append(templates[k].format(**fields))
  return out


def question_answers(rng: np.random.Generator, objects: list[dict],
                     count: int = QUESTIONS_PER_CLIP) -> tuple[list[str], list[str]]:
  """Questions about a clip and their answers, read off its `objects` attributes.

  Every applicable template (colour, size, direction or action of a shape; the shape or
  colour of the one object with a given colour or motion; the number of shapes; colour and
  shape of the object with a motion) gives one candidate; `count` of them are drawn without
  replacement.

  Returns:
    (questions, answers): aligned lists of at most `count` strings; answers are lowercase
    words ("red", "left", "two", "red circle", ...).
  """
  t = _QA_TEMPLATES
  motion_counts = {}
  colour_counts = {}
  for o in objects:
    motion_counts[o["motion"]] = motion_counts.get(o["motion"], 0) + 1
    colour_counts[o["colour"]] = colour_counts.get(o["colour"], 0) + 1
  cands = [(t["count"], COUNT_WORDS[len(objects)])]
  for o in objects:
    f = dict(shape=o["shape"], colour=o["colour"])
    cands.append((t["colour_of_shape"].format(**f), o["colour"]))
    cands.append((t["size"].format(**f), o["size"]))
    if o["motion"] in ("left", "right", "up", "down"):
      cands.append((t["direction"].format(**f), o["motion"]))
    else:
      cands.append((t["action"].format(**f), ACTION_ANSWERS[o["motion"]]))
    if colour_counts[o["colour"]] == 1:
      cands.append((t["shape_of_colour"].format(**f), o["shape"]))
    if motion_counts[o["motion"]] == 1:
      verbs = MOTION_PHRASES[o["motion"]][0]
      verb = verbs[rng.integers(len(verbs))]
      cands.append((t["colour_of_mover"].format(verb=verb), o["colour"]))
      cands.append((t["shape_of_mover"].format(verb=verb), o["shape"]))
      cands.append((t["object_of_mover"].format(verb=verb), f"{o['colour']} {o['shape']}"))
  picks = sorted(rng.choice(len(cands), size=min(count, len(cands)), replace=False))
  return [cands[i][0] for i in picks], [cands[i][1] for i in picks]


def topics(heldout: list[tuple[str, str]]) -> list[tuple[str, str]]:
  """The (shape, colour) topics of train / val / test clips (every pair not held out)."""
  held = set(heldout)
  return [(s, c) for s in SHAPES for c in COLOURS if (s, c) not in held]


def topic_weights(seed: int, heldout: list[tuple[str, str]], zipf: float) -> np.ndarray:
  """float64 [len(topics)] probabilities of each topic for the training split's first object.

  zipf = 0: uniform. Else topic ranked r (a seeded random order) has weight 1 / r^zipf: a long
  tail of rare topics, as in web video-text data.
  """
  n = len(topics(heldout))
  if zipf <= 0:
    return np.full(n, 1.0 / n)
  rank = np.empty(n)
  rank[np.random.default_rng([seed, 0x7A1]).permutation(n)] = np.arange(1, n + 1)
  w = rank ** -float(zipf)
  return w / w.sum()


def _objects(rng: np.random.Generator, split: str, heldout: list[tuple[str, str]],
             weights: np.ndarray | None = None) -> list[dict]:
  if split == "test_unseen":
    pairs = heldout
    count = 1
  else:
    pairs = topics(heldout)
    count = 2 if rng.random() < TWO_OBJECT_PROB else 1
  objects = []
  while len(objects) < count:
    if weights is not None and not objects:  # the clip's topic: its first object
      shape, colour = pairs[rng.choice(len(pairs), p=weights)]
    else:
      shape, colour = pairs[rng.integers(len(pairs))]
    if any(o["shape"] == shape for o in objects):  # two different shapes: captions unambiguous
      continue
    objects.append(dict(shape=shape, colour=colour, size=SIZES[rng.integers(len(SIZES))],
                        motion="still" if split == IMAGE_SPLIT else _sample_motion(rng, shape)))
  return objects


def _min_distance(tracks, objects, num_frames) -> float:
  ts = np.linspace(0.0, 1.0, max(num_frames, 2))
  p = [np.array([_pose(tr, o["motion"], t)[:3] for t in ts]) for tr, o in zip(tracks, objects)]
  gap = np.hypot(p[0][:, 0] - p[1][:, 0], p[0][:, 1] - p[1][:, 1]) - p[0][:, 2] - p[1][:, 2]
  return float(gap.min())


def class_names(labels: str = "motion") -> list[str]:
  """The class names of a labelling (`LABELINGS`), line i = label index i."""
  if labels == "motion":
    return [LABEL_TEXT[m] for m in MOTIONS]
  if labels == "colour_motion":
    return [f"{c} {LABEL_TEXT[m]}" for c in COLOURS for m in MOTIONS]
  if labels == "shape_motion":
    return [f"{s} {LABEL_TEXT[m]}" for s in SHAPES for m in MOTIONS
            if not (m == "rotates" and s in _NO_ROTATE)]
  raise ValueError(f"synthetic labels must be one of {LABELINGS}, got {labels!r}")


def render_clip(seed: int, split: str, index: int, num_frames: int, image_size: int,
                heldout: list[tuple[str, str]], weights: np.ndarray | None = None,
                labels: str = "motion") -> dict[str, Any]:
  """Renders one clip.

  Returns:
    dict with `video_id` (str), `frames` (list of JPEG bytes, num_frames of
    image_size x image_size RGB), `captions` (list of str), `objects` (list of dicts with
    shape, colour, size, motion), `label_index` / `label_text` (the first object's class in
    the labelling `labels`: `class_names(labels)`),
    `questions` / `answers` (aligned lists of str, `question_answers`).
    `weights`: topic probabilities of the first object (`topic_weights`); None = uniform.
  """
  rng = np.random.default_rng([seed, _SPLIT_CODE[split], index])
  objects = _objects(rng, split, heldout, weights)
  tracks = [_track(rng, o, image_size) for o in objects]
  if len(objects) == 2:  # a few tries to keep the two shapes apart for the whole clip
    best = (_min_distance(tracks, objects, num_frames), tracks)
    for _ in range(10):
      if best[0] >= 0:
        break
      cand = [_track(rng, o, image_size) for o in objects]
      best = max(best, (_min_distance(cand, objects, num_frames), cand), key=lambda b: b[0])
    tracks = best[1]
  captions = _captions(rng, objects, image=split == IMAGE_SPLIT)
  if split == IMAGE_SPLIT and len(objects) == 1:
    where = location_phrase(tracks[0]["x0"], tracks[0]["y0"], image_size)
    captions = [f"{c} {where}" for c in captions]
  bg = _background(rng, image_size)
  frames = []
  for f in range(num_frames):
    t = f / (num_frames - 1) if num_frames > 1 else 0.0
    noise = rng.normal(0.0, 3.0, (image_size, image_size, 1)).astype(np.float32)
    img = Image.fromarray(np.clip(bg + noise, 0, 255).astype(np.uint8))
    for obj, tr in zip(objects, tracks):
      mask = _shape_mask(obj["shape"], *_pose(tr, obj["motion"], t), image_size)
      img.paste(COLOURS[obj["colour"]], (0, 0), mask)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, subsampling=0)  # 4:4:4 keeps small shapes' colour
    frames.append(buf.getvalue())
  names = class_names(labels)
  label = LABEL_TEXT[objects[0]["motion"]]
  if _LABEL_PREFIX[labels]:
    label = f"{objects[0][_LABEL_PREFIX[labels]]} {label}"
  # Own rng stream: adding questions left frames and captions unchanged.
  questions, answers = question_answers(
      np.random.default_rng([seed, _SPLIT_CODE[split], index, 0x9A]), objects)
  return dict(video_id=f"shapes-{split}-{index:06d}", frames=frames, captions=captions,
              objects=objects, label_index=names.index(label), label_text=label,
              questions=questions, answers=answers)


def contrast_probes(objects: list[dict]) -> list[str]:
  """[caption, caption with the opposite motion] for one object with a directional motion.

  Both use the same canonical wording, so they differ only in the direction ("moves to the
  left" / "moves to the right", "grows" / "shrinks"): a model that ignores frame order scores
  them alike. Other clips get no probe ([]).
  """
  if len(objects) != 1 or objects[0]["motion"] not in OPPOSITE:
    return []
  o = objects[0]
  size = SIZE_WORDS[o["size"]][0]
  noun = f"{_article(size)} {size} {o['colour']} {o['shape']}"
  return [f"{noun} {MOTION_PHRASES[m][0][0]}" for m in (o["motion"], OPPOSITE[o["motion"]])]


def clip_record(clip: dict, num_frames: int):
  """The `tf.train.SequenceExample` of a rendered clip (records schema)."""
  from vlp_jax.data import records  # noqa: PLC0415  (tensorflow stays out of workers)
  entities = list(dict.fromkeys(o["shape"] for o in clip["objects"]))
  return records.clip_example(
      clip["video_id"], clip["frames"], clip["captions"], FPS,
      label_index=clip["label_index"], label_text=clip["label_text"], entities=entities,
      start_us=0, end_us=int(round(num_frames / FPS * 1e6)),
      contrast=contrast_probes(clip["objects"]),
      questions=clip.get("questions"), answers=clip.get("answers"),
      extra={"synthetic/attributes": [json.dumps(clip["objects"], sort_keys=True).encode()]})


def _params(seed, counts, num_frames, image_size, num_shards, topic_zipf=0.0,
            caption_noise=0.0, labels="motion") -> dict:
  # version 4: still images' captions say where the shape is (location_phrase).
  out = dict(version=4, seed=int(seed), counts={k: int(v) for k, v in counts.items()},
             num_frames=int(num_frames), image_size=int(image_size), num_shards=int(num_shards))
  if topic_zipf or caption_noise:  # absent when off: corpora written before keep their marker
    out.update(topic_zipf=float(topic_zipf), caption_noise=float(caption_noise))
  if labels != "motion":
    out.update(labels=labels)
  return out


NOISY_IDS_FILE = "train.noisy_ids.txt"  # training clips whose captions are another clip's
_DONORS = 64  # a noisy clip takes the captions of one of the last this many training clips


def generate(out_dir: str, *, seed: int, num_train: int, num_val: int, num_test: int,
             num_test_unseen: int, num_frames: int, image_size: int, num_shards: int,
             num_images: int = 0, topic_zipf: float = 0.0, caption_noise: float = 0.0,
             labels: str = "motion") -> dict:
  """Writes the corpus: all splits as TFRecord shards, `vocab.txt`, `entities.txt`,
  `synthetic.json`, `DONE`.

  `DONE` (the generation parameters as JSON) is written last, so an interrupted run is redone
  by `ensure`. Existing shards of these splits are replaced.

  Args:
    out_dir: output directory.
    seed: corpus seed; same seed and sizes give byte-identical files.
    num_train, num_val, num_test, num_test_unseen: clips per split.
    num_frames: stored frames per clip.
    image_size: frame side in pixels.
    num_shards: files per split.
    num_images: still images in split `images` (one frame each, no motion); 0 = no split.
    topic_zipf: long tail of the training split: its clips' (shape, colour) topic follows a
      Zipf law with this exponent (`topic_weights`); val / test stay uniform. 0 = uniform.
    caption_noise: fraction of training clips whose captions are replaced by those of another
      recent training clip of a different topic (mismatched pairs, as in web data); their
      ids go to `train.noisy_ids.txt`. Frames, attributes and questions stay the clip's own.
    labels: what the class labels name (`LABELINGS`); frames and captions do not depend on
      it, so corpora differing only here hold the same clips.

  Returns:
    Summary dict: `dir`, `counts` per split, `heldout_pairs`, `vocab_size`, `seconds`.
  """
  from vlp_jax.data import records, tokenizer  # noqa: PLC0415  (see clip_record)
  start = time.time()
  counts = dict(train=num_train, val=num_val, test=num_test, test_unseen=num_test_unseen)
  if num_images:
    counts[IMAGE_SPLIT] = num_images
  if not 0.0 <= caption_noise < 1.0:
    raise ValueError(f"caption_noise must be in [0, 1), got {caption_noise}")
  if topic_zipf < 0:
    raise ValueError(f"topic_zipf must be >= 0, got {topic_zipf}")
  names = class_names(labels)  # validates labels before anything is written
  params = _params(seed, counts, num_frames, image_size, num_shards, topic_zipf, caption_noise,
                   labels)
  os.makedirs(out_dir, exist_ok=True)
  meta_path = os.path.join(out_dir, "synthetic.json")
  done_path = os.path.join(out_dir, "DONE")
  if os.path.exists(done_path):
    os.remove(done_path)
  stale = [os.path.join(out_dir, f) for f in os.listdir(out_dir) if f.endswith(".tfrecord")
           and f.split("-")[0] in SPLITS + (IMAGE_SPLIT,)]
  if stale and not os.path.exists(meta_path):
    raise FileExistsError(f"{out_dir!r} holds TFRecord shards not written by the synthetic "
                          "generator; refusing to overwrite them")
  heldout = heldout_pairs(seed)
  meta = dict(params, shapes=list(SHAPES), colours=list(COLOURS), sizes=list(SIZES),
              motions=list(MOTIONS), label_text=names,
              opposite=OPPOSITE, heldout_pairs=[list(p) for p in heldout])
  with open(meta_path, "w") as f:
    json.dump(meta, f, indent=1, sort_keys=True)
  for path in stale:  # e.g. a different num_shards last time: would be read as extra files
    records.remove_shard(path)

  # In-process on purpose: the demo corpus takes ~20 s, and forking a process that already
  # runs JAX / TF threads can deadlock.
  weights = topic_weights(seed, heldout, topic_zipf) if topic_zipf else None
  noisy = []
  for split, n in counts.items():
    donors: list[tuple[tuple[str, str], list[str]]] = []
    with records.ShardedWriter(out_dir, split, num_shards) as writer:
      for i in range(n):
        frames = 1 if split == IMAGE_SPLIT else num_frames
        clip = render_clip(seed, split, i, frames, image_size, heldout,
                           weights if split == "train" else None, labels)
        if split == "train" and caption_noise:
          topic = (clip["objects"][0]["shape"], clip["objects"][0]["colour"])
          rng = np.random.default_rng([seed, _SPLIT_CODE[split], i, 0x401])
          others = [c for t, c in donors if t != topic]
          own = clip["captions"]
          if others and rng.random() < caption_noise:
            clip = dict(clip, captions=others[rng.integers(len(others))])
            noisy.append(clip["video_id"])
          donors = (donors + [(topic, own)])[-_DONORS:]
        writer.write(clip_record(clip, frames))
  noisy_path = os.path.join(out_dir, NOISY_IDS_FILE)
  if noisy:
    with open(noisy_path, "w") as f:
      f.write("\n".join(noisy) + "\n")
  elif os.path.exists(noisy_path):
    os.remove(noisy_path)
  with open(os.path.join(out_dir, ENTITIES_FILE), "w") as f:
    f.write("\n".join(SHAPES) + "\n")
  vocab_size = tokenizer.write_vocab(os.path.join(out_dir, "vocab.txt"),
                                     tokenizer.synthetic_vocab_words())
  with open(done_path, "w") as f:
    json.dump(params, f, sort_keys=True)
  return dict(dir=out_dir, counts=counts, heldout_pairs=heldout, vocab_size=vocab_size,
              noisy_train=len(noisy), seconds=time.time() - start)


def ensure(out_dir: str, synthetic_cfg) -> dict | None:
  """Generates the corpus into `out_dir` unless a matching `DONE` marker is there.

  Args:
    out_dir: data directory.
    synthetic_cfg: `config.data.synthetic` (seed, num_train, num_val, num_test,
      num_test_unseen, num_frames, image_size, num_shards, optional num_images, topic_zipf,
      caption_noise, labels).

  Returns:
    generate()'s summary when it generated, else None.
  """
  c = synthetic_cfg
  counts = dict(train=c.num_train, val=c.num_val, test=c.num_test,
                test_unseen=c.num_test_unseen)
  num_images = int(c.get("num_images", 0))
  if num_images:
    counts[IMAGE_SPLIT] = num_images
  zipf, noise = float(c.get("topic_zipf", 0.0)), float(c.get("caption_noise", 0.0))
  labels = str(c.get("labels", "motion"))
  params = _params(c.seed, counts, c.num_frames, c.image_size, c.num_shards, zipf, noise, labels)
  done_path = os.path.join(out_dir, "DONE")
  if os.path.exists(done_path):
    try:
      with open(done_path) as f:
        if json.load(f) == params:
          return None
    except (OSError, ValueError):
      pass  # unreadable marker: regenerate
  return generate(out_dir, seed=c.seed, num_train=c.num_train, num_val=c.num_val,
                  num_test=c.num_test, num_test_unseen=c.num_test_unseen,
                  num_frames=c.num_frames, image_size=c.image_size, num_shards=c.num_shards,
                  num_images=num_images, topic_zipf=zipf, caption_noise=noise, labels=labels)
