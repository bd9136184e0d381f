"""TFDS builders for the synthetic tasks (array_record on disk, read with ``tfds.data_source``).

No TensorFlow and no network: the builders generate their examples locally. Each task has a
``default`` config (20,000 train / 500 validation / 500 test examples) and a ``small`` one
(200 / 50 / 50) for tests. The three splits are disjoint by prompt: test excludes train (as in
1.0.0, so test sets are unchanged), validation excludes both. Choices (LR, steps) are made on
validation; test is read once per final run.

    source = task_source("addition", "test", data_dir="~/tensorflow_datasets")
    len(source), source[0]  # {"prompt": b"...", "response": b"..."}
"""

from __future__ import annotations

import dataclasses
import os

from icarus_jax.training import tasks as task_lib

_BUILDERS: dict[str, type] = {}


def _tfds():
  import tensorflow_datasets as tfds  # imported lazily: slow-ish and optional for serving
  return tfds


def builder_class(task: str):
  """The ``GeneratorBasedBuilder`` subclass for ``task`` (registered as ``icarus_<task>``)."""
  task_lib.check_task(task)
  if task in _BUILDERS:
    return _BUILDERS[task]
  tfds = _tfds()

  @dataclasses.dataclass
  class TaskConfig(tfds.core.BuilderConfig):
    num_train: int = 20000
    num_test: int = 500
    num_validation: int = 500

  class Builder(tfds.core.GeneratorBasedBuilder):
    name = f"icarus_{task}"
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.1.0": "validation split (disjoint from train and test)"}
    BUILDER_CONFIGS = [TaskConfig(name="default", num_train=20000, num_test=500,
                                  num_validation=500),
                       TaskConfig(name="small", num_train=200, num_test=50, num_validation=50)]

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, description=f"icarus-jax synthetic task {task!r}",
          features=tfds.features.FeaturesDict({"prompt": tfds.features.Text(),
                                               "response": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      del dl_manager
      c = self.builder_config
      splits = task_lib.make_splits(task, c.num_train, c.num_test, c.num_validation)
      return {name: self._generate_examples(examples) for name, examples in splits.items()}

    def _generate_examples(self, examples):
      yield from enumerate(examples)

  Builder.__name__ = "Icarus" + "".join(p.title() for p in task.split("_"))
  _BUILDERS[task] = Builder
  return Builder


def prepare(task: str, *, data_dir: str | os.PathLike | None = None, config: str = "default"):
  """Builds (once) and returns the builder; data lands in ``data_dir/icarus_<task>/<config>``."""
  data_dir = os.fspath(data_dir or os.path.expanduser("~/tensorflow_datasets"))
  _tfds().disable_progress_bar()
  b = builder_class(task)(data_dir=data_dir, config=config)
  b.download_and_prepare(file_format="array_record")
  return b


def task_source(task: str, split: str, *, data_dir=None, config: str = "default"):
  """Random-access source of ``{"prompt": bytes, "response": bytes}`` for one split."""
  return prepare(task, data_dir=data_dir, config=config).as_data_source(split=split)
