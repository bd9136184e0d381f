"""The OpenAI-compatible wire protocol: request bodies (pydantic, validated at the edge), the
error type and the OpenAI error body. No FastAPI, no engine: importable and testable alone.

Validation here is what keeps bad values out of shared batches: ranges that fit the sampler's
fixed-width arrays, no lone UTF-16 surrogates anywhere in a body (valid JSON, invalid text),
``n`` bounded.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_N = 16
MAX_CHOICES = 256  # prompts x n in one completions request


def _check_text(value: Any, where: str = "body") -> None:
  """Refuses strings that cannot be UTF-8 encoded (a lone UTF-16 surrogate such as ``\\ud800``
  is valid JSON but no tokenizer can take it): a 400 naming the field, never a 500."""
  if isinstance(value, str):
    try:
      value.encode("utf-8")
    except UnicodeEncodeError as e:
      raise ValueError(f"{where} holds a lone UTF-16 surrogate at character {e.start} "
                       f"({value[e.start:e.end].encode('utf-8', 'backslashreplace').decode()}); "
                       f"send valid Unicode text") from None
  elif isinstance(value, dict):
    for k, v in value.items():
      _check_text(k, where)
      _check_text(v, f"{where}.{k}")
  elif isinstance(value, list):
    for i, v in enumerate(value):
      _check_text(v, f"{where}[{i}]")


class _Body(BaseModel):
  @model_validator(mode="before")
  @classmethod
  def _valid_unicode(cls, data):
    _check_text(data)
    return data


INT64 = 2**63


class SamplingRequest(_Body):
  """Fields every generation request shares (completions and chat)."""
  model_config = ConfigDict(extra="ignore")
  model: str
  max_tokens: int | None = Field(default=None, ge=1)  # None: the rest of the context
  max_completion_tokens: int | None = Field(default=None, ge=1)
  temperature: float = Field(default=1.0, ge=0.0, le=2.0)
  top_p: float = Field(default=1.0, gt=0.0, le=1.0)
  top_k: int = Field(default=0, ge=-1, lt=2**31)
  seed: int | None = Field(default=None, ge=-INT64, lt=INT64)
  logprobs: Any = None
  top_logprobs: Any = None
  stop: str | list[str] | None = None
  stop_token_ids: list[int] | None = Field(default=None, max_length=1024)
  ignore_eos: bool = False
  n: int = Field(default=1, ge=1, le=MAX_N)
  stream: bool = False
  stream_options: dict | None = None
  user: str | None = None
  cache_salt: str | None = None
  return_token_ids: bool = False
  presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
  frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
  repetition_penalty: float = Field(default=1.0, gt=0.0, le=1e4)
  min_p: float = Field(default=0.0, ge=0.0, le=1.0)
  logit_bias: dict[str, float] | None = Field(default=None, max_length=1024)


class CompletionRequest(SamplingRequest):
  prompt: str | list[int] | list[str] | list[list[int]]
  echo: bool = False
  response_format: dict[str, Any] | None = None


class ChatMessage(_Body):
  """A message as OpenAI clients send it: ``content`` may be null on an assistant message that
  carries ``tool_calls``; a ``tool`` message answers one call (``tool_call_id``)."""
  model_config = ConfigDict(extra="ignore")
  role: Literal["system", "developer", "user", "assistant", "tool"]
  content: str | list[dict[str, Any]] | None = None
  tool_calls: list[dict[str, Any]] | None = None
  tool_call_id: str | None = None
  name: str | None = None

  @model_validator(mode="after")
  def _content_or_calls(self):
    if self.content is None and not (self.role == "assistant" and self.tool_calls):
      raise ValueError("content is required (it may be null only on an assistant message with "
                       "tool_calls)")
    return self


class ChatRequest(SamplingRequest):
  messages: list[ChatMessage] = Field(min_length=1)
  tools: list[dict[str, Any]] | None = Field(default=None, max_length=128)
  tool_choice: str | dict[str, Any] | None = None
  parallel_tool_calls: bool | None = None
  response_format: dict[str, Any] | None = None


class LoadLoraRequest(_Body):
  lora_name: str = Field(min_length=1)
  lora_path: str = Field(min_length=1)


class UnloadLoraRequest(_Body):
  lora_name: str = Field(min_length=1)


class APIError(Exception):
  def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
               param: str | None = None, code: str | None = None):
    super().__init__(message)
    self.status, self.message, self.type, self.param = status, message, type_, param
    self.code = code


def error_response(status: int, message: str, type_: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None) -> JSONResponse:
  return JSONResponse({"error": {"message": message, "type": type_, "param": param,
                                 "code": code or str(status)}}, status_code=status)


def first_line(e: BaseException, limit: int = 300) -> str:
  """An error's first line, truncated: never a dump of a file's contents."""
  text = str(e).strip().splitlines()
  return (text[0] if text else type(e).__name__)[:limit]
