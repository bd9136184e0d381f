"""Last step of device_check.sh gpu|tpu: one JSON line with every part's result.

  OUT=<dir> python benchmarks/device_check_summary.py <gpu|tpu> rc_tests rc_bench rc_steps rc_wf
"""

import json
import os
import sys
from pathlib import Path


def load(path: Path):
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def main():
  kind, *rcs = sys.argv[1:]
  out = Path(os.environ["OUT"])
  names = ("kernel_tests", "kernel_bench", "device_steps", "workflow_point")
  res = {"check": kind, "rc": dict(zip(names, map(int, rcs)))}
  kern = load(out / f"kernels_{kind}.json") or {}
  dec = [r for r in kern.get("rows", []) if r.get("kind") == "decode"
         and r.get("bw_fraction") is not None]
  if dec:
    best = max(dec, key=lambda r: r["bw_fraction"])
    res["decode_bw_fraction_best"] = best["bw_fraction"]
    res["decode_bw_point"] = {k: best.get(k) for k in ("batch", "streams", "context", "page_size")}
  steps = load(out / "device_steps.json")
  if steps:
    res["step_s"] = steps["steps_s"]
    res["icarus_over_isolated_step"] = steps["icarus_over_isolated"]
  wf = load(out / "workflow.json")
  if wf:
    res["workflow"] = wf.get("summary", wf) if isinstance(wf, dict) else wf
  print(json.dumps(res, default=str)[:20000])
  sys.exit(1 if any(map(int, rcs)) else 0)


if __name__ == "__main__":
  main()
