"""``launch.serve`` with a device fault injected after dispatch (test helper, run as a script).

    python tests/fault_server.py FAULT_AT_STEP --port=... [serve flags]

The runner's ``execute`` runs step ``FAULT_AT_STEP`` for real (the pool is donated to the
program), then deletes the pool's buffers and raises, as a device error after dispatch would.
"""

import sys

from absl import app

import launch.serve as serve


def main():
  fault_at = int(sys.argv.pop(1))
  build = serve.build

  def faulty_build(*a, **k):
    aengine, api = build(*a, **k)
    runner = aengine.engine.runner
    execute, n = runner.execute, [0]

    def execute_then_fault(step):
      out = execute(step)
      n[0] += 1
      if n[0] == fault_at:
        runner.pages.delete()
        raise RuntimeError("injected device fault after dispatch")
      return out
    runner.execute = execute_then_fault
    return aengine, api
  serve.build = faulty_build
  app.run(serve.main)


if __name__ == "__main__":
  main()
