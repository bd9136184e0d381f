"""Exception types raised by icarus-jax.

Every error subclasses ``ValueError`` so callers that only know the standard
library still catch them; the subclasses let servers map them to status codes.
"""


class IcarusError(ValueError):
  """Base class of every error raised on bad user input."""


class ConfigError(IcarusError):
  """A model config is missing fields, has inconsistent sizes or names an unknown architecture."""


class CheckpointError(IcarusError):
  """A checkpoint directory or file is malformed (missing/mis-shaped tensor, truncated file...)."""


class AdapterGateError(IcarusError):
  """An adapter would change the encoder's K/V, so it cannot share the ICaRus cache."""


class FingerprintMismatchError(IcarusError):
  """An adapter was trained on another base model than the one it is applied to."""


class UnknownAdapterError(IcarusError):
  """A request names an adapter that is not registered (HTTP 404 in the server)."""


class RequestTooLargeError(IcarusError):
  """A request can never fit: longer than the model's context or than the whole KV pool."""


class ExampleTooLongError(IcarusError):
  """A training example does not fit the sequence length (callers may drop and count it)."""


class EngineStateLostError(RuntimeError):
  """A step failed after its KV pool was donated to the device program: the pool (every live
  request's K/V and the prefix cache) is gone, so nothing can be re-run. Not an ``IcarusError``
  (not the user's input): the engine is dead and its process should be restarted."""
