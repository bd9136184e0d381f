"""absl flags generated from a config dataclass, so a launch script declares no field twice.

    define_dataclass_flags(EngineConfig, defaults={"num_pages": 512}, aliases={"kv_pages": "num_pages"})
    ec = dataclass_from_flags(EngineConfig)   # validated by the dataclass itself

A field's flag has the field's name, type (int, float, bool, str, an optional of one of these, or
a tuple of str as a comma list), default (overridable per script) and help
(``field.metadata["help"]``); ``metadata["choices"]`` makes it an enum. ``aliases`` keeps old
flag names working (absl ``DEFINE_alias``).
"""

from __future__ import annotations

import dataclasses
import types
import typing

from absl import flags


def _base_type(tp):
  """The python type of an annotation like ``int``, ``int | None`` (optional fields take
  ``None`` as their default) or ``tuple[str, ...]`` (-> ``tuple``)."""
  if typing.get_origin(tp) in (typing.Union, types.UnionType):
    tp = next(a for a in typing.get_args(tp) if a is not type(None))
  return tuple if typing.get_origin(tp) is tuple else tp


def define_dataclass_flags(cls, *, defaults: dict | None = None, aliases: dict | None = None,
                           skip: tuple[str, ...] = (), flag_values=flags.FLAGS) -> list[str]:
  """Defines one absl flag per field of ``cls`` (except ``skip``); returns their names."""
  hints = typing.get_type_hints(cls)
  defaults = defaults or {}
  names = []
  for f in dataclasses.fields(cls):
    if f.name in skip:
      continue
    tp = _base_type(hints[f.name])
    default = defaults.get(f.name, f.default)
    help_ = f.metadata.get("help", f.name)
    choices = f.metadata.get("choices")
    kw = {"flag_values": flag_values}
    if choices:
      flags.DEFINE_enum(f.name, default, list(choices), help_, **kw)
    elif tp is bool:
      flags.DEFINE_bool(f.name, default, help_, **kw)
    elif tp is int:
      flags.DEFINE_integer(f.name, default, help_, **kw)
    elif tp is float:
      flags.DEFINE_float(f.name, default, help_, **kw)
    elif tp is str:
      flags.DEFINE_string(f.name, default, help_, **kw)
    elif tp is tuple:
      flags.DEFINE_list(f.name, None if default is None else list(default), help_, **kw)
    else:
      raise TypeError(f"{cls.__name__}.{f.name}: no flag type for {hints[f.name]!r}")
    names.append(f.name)
  for old, new in (aliases or {}).items():
    flags.DEFINE_alias(old, new, flag_values=flag_values)
  return names


def dataclass_from_flags(cls, *, skip: tuple[str, ...] = (), flag_values=flags.FLAGS, **extra):
  """An instance of ``cls`` from the parsed flags (list flags become tuples); ``extra`` sets the
  skipped fields."""
  hints = typing.get_type_hints(cls)
  kw = dict(extra)
  for f in dataclasses.fields(cls):
    if f.name in skip or f.name in kw:
      continue
    v = flag_values[f.name].value
    if _base_type(hints[f.name]) is tuple and v is not None:
      v = tuple(v)
    kw[f.name] = v
  return cls(**kw)


def quiet_logs(flag_values) -> None:
  """Library INFO logs (Orbax, absl, JAX, TFDS) off unless the user asked with ``--verbosity``
  (or ``-v``): an entry point's own output and progress bar stay readable."""
  import logging
  from absl import logging as absl_logging
  if flag_values["verbosity"].present:
    return
  absl_logging.set_verbosity(absl_logging.WARNING)
  for name in ("absl", "orbax", "jax", "etils", "tensorflow_datasets"):
    logging.getLogger(name).setLevel(logging.WARNING)
