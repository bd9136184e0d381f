"""Agentic multi-model workloads (ReAct / Reflexion style) for the workflow benchmark.

A workflow is a shared system prompt and task context followed by a chain of turns. Turn ``k``
is served by model ``m_k`` (round-robin over N models, or Zipf-skewed); its prompt is the whole
shared context so far plus a short turn header; its output and a simulated tool observation are
appended to the shared context for the next turn. Workflows arrive as a Poisson process
(gamma-distributed gaps with shape ``burstiness``; 1 = Poisson, < 1 burstier), as in vLLM's
``--request-rate`` / ``--burstiness``.

Presets (``PRESETS``; every distribution's source is in ``docs/benchmarks.md``):

* ``paper``: the fixed-length round-robin chain above (``WorkloadConfig``; kept as it was).
* ``agentic``: shaped like ReAct/Reflexion agent traces (``AgentWorkloadConfig``): a shared
  system prompt with tool descriptions and few-shot examples (2-4k tokens), a task, 6-12 turns
  of short actions (thought + tool call, lognormal, 30-200 tokens) and long observations
  (lognormal, 200-1500 tokens), a tool latency between turns (0.2-3 s) during which the
  context must survive; routing round-robin (the paper's) or by role (planner / executor /
  critic: a model is revisited within a workflow).
* ``coding``: shaped like today's coding agents (TraceLab: ~19K-token system prompt with tool
  definitions, ~870 new tokens per call, output median ~250 / p90 ~1,600, 16-30 turns), scaled
  to the model's context by ``coding_agent_config(max_context)``.

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
  tool_latency: float = 0.0        # seconds between this turn's output and the next turn's send


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


# ------------------------------------------------------------------------------ agent presets
ROUTINGS = ("round_robin", "roles")
ROLES = ("planner", "executor", "critic")


@dataclasses.dataclass(frozen=True)
class LogNormal:
  """Token counts ``round(median * exp(sigma * z))`` clipped to ``[low, high]``."""

  median: float
  sigma: float
  low: int
  high: int

  def sample(self, rng: np.random.RandomState, scale: float = 1.0) -> int:
    x = self.median * math.exp(self.sigma * rng.standard_normal())
    return int(min(max(round(x * scale), max(1, round(self.low * scale))),
                   max(1, round(self.high * scale))))


@dataclasses.dataclass(frozen=True)
class AgentWorkloadConfig:
  """Agent-shaped workflows; token lengths are multiplied by ``scale`` (to fit small models)."""

  num_workflows: int = 100
  num_models: int = 8
  request_rate: float = 0.2
  burstiness: float = 1.0
  routing: str = "round_robin"                  # or "roles"
  system_len: tuple[int, int] = (2048, 4096)    # shared by every workflow, drawn once
  task_len: tuple[int, int] = (64, 512)         # per workflow
  turns: tuple[int, int] = (6, 12)              # inclusive
  header_len: int = 8
  action: LogNormal = LogNormal(80, 0.5, 30, 200)          # output tokens per turn
  observation: LogNormal = LogNormal(550, 0.6, 200, 1500)  # tool output appended per turn
  tool_latency: tuple[float, float] = (0.2, 3.0)           # log-uniform seconds
  scale: float = 1.0
  seed: int = 0
  token_low: int = 32
  token_high: int = 127
  # A workflow ends at the last turn whose prompt plus output fits this many tokens (the model's
  # window), as a coding agent stops or compacts when its context is full; None: never cut.
  max_context: int | None = None

  def __post_init__(self):
    if self.max_context is not None and self.max_context < 1:
      raise IcarusError(f"max_context must be >= 1 or None, got {self.max_context}")
    if self.routing not in ROUTINGS:
      raise IcarusError(f"routing={self.routing!r}; accepted: {ROUTINGS}")
    if self.num_models < 1 or self.num_workflows < 1:
      raise IcarusError("num_models and num_workflows must be >= 1")
    if not self.request_rate > 0:
      raise IcarusError(f"request_rate must be > 0 (or inf), got {self.request_rate}")
    if not 0 < self.scale:
      raise IcarusError(f"scale must be > 0, got {self.scale}")

  def max_prompt_len(self) -> int:
    """Longest possible prompt of the last turn (every length at its upper clip)."""
    s = lambda n: max(1, round(n * self.scale))  # noqa: E731
    n = self.turns[1]
    return (s(self.system_len[1]) + s(self.task_len[1]) + n * self.header_len
            + (n - 1) * (s(self.action.high) + s(self.observation.high)))


def coding_agent_config(max_context: int, **kw) -> AgentWorkloadConfig:
  """The coding-agent preset scaled so that a typical workflow (every length at its median,
  the most turns) fills 90% of ``max_context`` tokens. The long tail does not fit at that scale;
  such a workflow ends at its last turn that fits (``AgentWorkloadConfig.max_context``), as a
  coding agent stops or compacts when its window is full.

  Unscaled (TraceLab, docs/benchmarks.md): ~19K-token system prompt + tool definitions, 16-30
  turns, ~870 new tokens per call (here: the tool observation), output median ~250 with p90
  ~1,600 (lognormal sigma = ln(1600/250) / 1.2816 = 1.45, clipped to 4,096), tool time 0.7-18 s.
  """
  base = AgentWorkloadConfig(
      system_len=(18000, 20000), task_len=(200, 2000), turns=(16, 30),
      action=LogNormal(250, 1.45, 16, 4096), observation=LogNormal(870, 0.8, 50, 8000),
      tool_latency=(0.7, 18.0), **kw)
  # expected (not worst-case) final context; the worst case is clipped by the engine's limit
  n = base.turns[1]
  typical = (base.system_len[1] + base.task_len[1]
             + n * (base.header_len + 2 * base.action.median + 1.5 * base.observation.median))
  scale = min(1.0, 0.9 * max_context / typical)
  return dataclasses.replace(base, scale=kw.get("scale", scale),
                             max_context=kw.get("max_context", max_context))


def _log_uniform(rng, lo: float, hi: float) -> float:
  return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def generate_agent_workflows(cfg: AgentWorkloadConfig) -> list[Workflow]:
  """Agent-shaped workflows (see the module docstring). Deterministic in ``cfg.seed``."""
  rng = np.random.RandomState(cfg.seed)
  tok = lambda n: tuple(int(x) for x in rng.randint(cfg.token_low, cfg.token_high, n))  # noqa: E731
  sc = lambda n: max(1, round(n * cfg.scale))  # noqa: E731
  system = tok(sc(rng.randint(cfg.system_len[0], cfg.system_len[1] + 1)))
  t, out = 0.0, []
  for w in range(cfg.num_workflows):
    if w > 0 and math.isfinite(cfg.request_rate):
      t += float(rng.gamma(cfg.burstiness, 1.0 / (cfg.request_rate * cfg.burstiness)))
    task = tok(sc(rng.randint(cfg.task_len[0], cfg.task_len[1] + 1)))
    n_turns = int(rng.randint(cfg.turns[0], cfg.turns[1] + 1))
    # roles: plan, then execute / critique alternately, re-planning every 4th turn; each role is
    # one model of this workflow, so models are revisited within it
    role_models = [(w + r) % cfg.num_models for r in range(len(ROLES))]
    turns = []
    for k in range(n_turns):
      if cfg.routing == "round_robin":
        m = (w + k) % cfg.num_models
      else:
        role = 0 if k % 4 == 0 else (1 if k % 2 else 2)
        m = role_models[role]
      last = k == n_turns - 1
      turns.append(Turn(m, tok(cfg.header_len),
                        () if last else tok(cfg.observation.sample(rng, cfg.scale)),
                        cfg.action.sample(rng, cfg.scale),
                        0.0 if last else _log_uniform(rng, *cfg.tool_latency)))
    if cfg.max_context is not None:
      turns = _fit_context(turns, len(system) + len(task), cfg.max_context, w)
    out.append(Workflow(w, t, system + task, tuple(turns)))
  return out


def _fit_context(turns: list[Turn], prefix_len: int, max_context: int, wid: int) -> list[Turn]:
  """The turns whose prompt plus output fit ``max_context`` tokens; the last one kept becomes
  the workflow's last turn (no observation, no tool wait). Every draw was made before, so the
  workflows that fit are the same with or without a limit."""
  ctx, keep = prefix_len, 0
  for tr in turns:
    if ctx + len(tr.header) + tr.max_tokens > max_context:
      break
    ctx += len(tr.header) + tr.max_tokens + len(tr.observation)
    keep += 1
  if keep == 0:
    raise IcarusError(f"workflow {wid}: its first turn needs {prefix_len + len(turns[0].header)}"
                      f" + {turns[0].max_tokens} tokens, more than max_context={max_context}")
  if keep == len(turns):
    return turns
  return turns[:keep - 1] + [dataclasses.replace(turns[keep - 1], observation=(),
                                                 tool_latency=0.0)]


PRESETS = ("paper", "agentic", "coding")
