"""Agentic multi-model workloads (ReAct / Reflexion style) for the workflow benchmark.

A workflow is a shared system prompt and task context followed by a chain of turns. Turn ``k``
is served by model ``m_k`` (round-robin over N models, or Zipf-skewed); its prompt is the whole
shared context so far plus a short turn header; its output and a simulated tool observation are
appended to the shared context for the next turn. Workflows arrive as a Poisson process
(gamma-distributed gaps with shape ``burstiness``; 1 = Poisson, < 1 burstier), as in vLLM's
``--request-rate`` / ``--burstiness``.

Everything is a deterministic function of the seed.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from icarus_jax.errors import IcarusError


@dataclasses.dataclass(frozen=True)
class WorkloadConfig:
  num_workflows: int = 8
  num_models: int = 4
  request_rate: float = 1.0          # workflows per second; inf = all at t=0
  burstiness: float = 1.0
  num_turns: int = 4
  system_len: int = 64               # shared by every workflow
  context_len: int = 48              # per-workflow task context
  header_len: int = 8                # per turn: "Thought k / Action" header
  output_len: int = 16               # tokens generated per turn (fixed, like --ignore-eos)
  observation_len: int = 24          # simulated tool output appended after each turn
  assignment: str = "round_robin"    # or "zipf"
  zipf_alpha: float = 1.5
  seed: int = 0
  token_low: int = 32                # token ids are drawn from [token_low, token_high)
  token_high: int = 127

  def __post_init__(self):
    if self.num_models < 1 or self.num_workflows < 1 or self.num_turns < 1:
      raise IcarusError("num_models, num_workflows and num_turns must be >= 1")
    if self.assignment not in ("round_robin", "zipf"):
      raise IcarusError(f"assignment={self.assignment!r}; accepted: round_robin, zipf")
    if not self.request_rate > 0:
      raise IcarusError(f"request_rate must be > 0 (or inf), got {self.request_rate}")

  def max_prompt_len(self) -> int:
    return (self.system_len + self.context_len + self.num_turns * self.header_len
            + (self.num_turns - 1) * (self.output_len + self.observation_len))


@dataclasses.dataclass(frozen=True)
class Turn:
  model: int
  header: tuple[int, ...]
  observation: tuple[int, ...]
  max_tokens: int


@dataclasses.dataclass(frozen=True)
class Workflow:
  wid: int
  arrival: float
  prefix: tuple[int, ...]          # system prompt + task context
  turns: tuple[Turn, ...]

  def prompt_for(self, k: int, outputs: list[list[int]]) -> list[int]:
    """Prompt of turn ``k`` given the outputs of turns ``0..k-1``."""
    p = list(self.prefix)
    for j in range(k):
      p += list(self.turns[j].header) + list(outputs[j]) + list(self.turns[j].observation)
    return p + list(self.turns[k].header)


def _zipf_probs(n: int, alpha: float) -> np.ndarray:
  w = 1.0 / np.arange(1, n + 1) ** alpha
  return w / w.sum()


def generate_workflows(cfg: WorkloadConfig) -> list[Workflow]:
  rng = np.random.RandomState(cfg.seed)
  tok = lambda n: tuple(int(x) for x in rng.randint(cfg.token_low, cfg.token_high, n))
  system = tok(cfg.system_len)
  t = 0.0
  out = []
  probs = _zipf_probs(cfg.num_models, cfg.zipf_alpha)
  for w in range(cfg.num_workflows):
    if w > 0 and math.isfinite(cfg.request_rate):
      theta = 1.0 / (cfg.request_rate * cfg.burstiness)
      t += float(rng.gamma(cfg.burstiness, theta))
    turns = []
    for k in range(cfg.num_turns):
      if cfg.assignment == "round_robin":
        m = (w + k) % cfg.num_models
      else:
        m = int(rng.choice(cfg.num_models, p=probs))
      turns.append(Turn(m, tok(cfg.header_len), tok(cfg.observation_len), cfg.output_len))
    out.append(Workflow(w, t, system + tok(cfg.context_len), tuple(turns)))
  return out
