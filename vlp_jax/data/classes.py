"""Class-name lists of action recognition data: one name per line, line i = label index i.

`ingest` reads the same format (`--classes`); the synthetic corpus has no such file but lists
its label texts in DATA_DIR/synthetic.json (`label_text`, in label-index order), from which
`class_names` writes DATA_DIR/classes.txt on first use.
"""
from __future__ import annotations

import json
import os

CLASSES_FILE = "classes.txt"  # under the data directory
SYNTHETIC_META = "synthetic.json"


def read_class_names(path: str) -> list[str]:
  """The names of a class list (surrounding whitespace stripped; blank lines are not allowed,
  since line i is label index i).

  Raises:
    FileNotFoundError: no such file.
    ValueError: an empty file, a blank line, or a name listed twice (names the line).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"class list {path!r} does not exist (one class name per line, "
                            "line i = label index i)")
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  while lines and not lines[-1].strip():  # trailing newlines
    lines.pop()
  names, seen = [], {}
  for number, line in enumerate(lines, 1):
    name = line.strip()
    if not name:
      raise ValueError(f"{path}:{number}: blank line (line i names label index i)")
    if name in seen:
      raise ValueError(f"{path}:{number}: class {name!r} is already named on line {seen[name]}")
    seen[name] = number
    names.append(name)
  if not names:
    raise ValueError(f"class list {path!r} is empty")
  return names


def class_names(path: str, data_dir: str | None, *, write: bool = True) -> list[str]:
  """The class names of a run: the file `path`, or DATA_DIR/classes.txt when `path` is "".

  A data directory of the synthetic corpus without classes.txt gets one written from its
  synthetic.json's `label_text` (only when `write`: one process of a run writes it).

  Raises:
    ValueError: `path` is "" and there is no data directory.
    FileNotFoundError: the file does not exist and cannot be made.
  """
  if path:
    return read_class_names(path)
  if not data_dir:
    raise ValueError("data.classes is empty and there is no data directory to find "
                     "classes.txt in")
  target = os.path.join(data_dir, CLASSES_FILE)
  meta = os.path.join(data_dir, SYNTHETIC_META)
  if not os.path.isfile(target) and os.path.isfile(meta):
    with open(meta, encoding="utf-8") as f:
      names = [str(n) for n in json.load(f)["label_text"]]
    if not write:
      return names
    tmp = target + f".tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write("\n".join(names) + "\n")
    os.replace(tmp, target)
  return read_class_names(target)
