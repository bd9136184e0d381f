"""The hand-planted bug catalogue of ``benchmarks/mutation.py`` stays applicable: every planted
bug's text occurs exactly once in its module (a refactor that moves the code must move the
catalogue with it, or ``--planted`` stops testing anything)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_planted_bug_still_applies():
  code = ("import json, sys; sys.argv = ['x']\n"
          "from benchmarks.mutation import PLANTED, TARGETS, ROOT\n"
          "print(json.dumps({'planted': [(n, (ROOT / m).read_text().count(o)) "
          "for n, m, o, _, _ in PLANTED], 'targets': [(t.name, (ROOT / t.module).exists()) "
          "for t in TARGETS]}))")
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                     check=True)
  got = json.loads(r.stdout.strip().splitlines()[-1])
  assert len(got["planted"]) >= 8
  assert [n for n, count in got["planted"] if count != 1] == []
  assert [n for n, ok in got["targets"] if not ok] == []
