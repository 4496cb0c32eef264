"""Real-data ingestion: annotation files + video/image files -> TFRecord shards.

  annotations.py  one parser per dataset format -> `Clip` descriptions
  decode.py       PyAV decode of one clip, resampled to a fixed fps, resized, JPEG-encoded
  run.py          sharding, worker processes, resume, `skipped.jsonl`, `vocab.txt`, `ingest.json`

The command line is `python -m launch.ingest`. Worker processes import only `decode` (PyAV,
Pillow, numpy): tensorflow stays in the parent, which writes the records.
"""
