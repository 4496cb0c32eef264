"""Objectives by name (`config.task`)."""
from __future__ import annotations


def get_task(config, vocab_size: int):
  """Builds the task object named by `config.task`."""
  if config.task == "alpro":
    from vlp_jax.train.tasks.alpro import ALPROTask
    return ALPROTask(config, vocab_size)
  if config.task == "alpro_qa":
    from vlp_jax.train.tasks.alpro_qa import ALPROQATask
    return ALPROQATask(config, vocab_size)
  raise ValueError(f"unknown config.task {config.task!r}; known: ['alpro', 'alpro_qa']")
