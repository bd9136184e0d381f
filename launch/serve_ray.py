r"""ICaRus replicas on Ray Serve, routed by shared context (``icarus_jax/serving/ray_app.py``).

  python -m launch.serve_ray --replicas=2                      # local Ray, embedded base
  python -m launch.serve_ray --address=auto --replicas=8 --base=/ckpt/Llama-3.1-8B \
      --adapters=/adapters --replica_gpus=1 --router=context --port=8000

Starts Ray (``--address``: an existing cluster, e.g. ``auto`` on a cluster node or
``ray://head:10001``; default: a local one), deploys ``--replicas`` engine replicas behind one
OpenAI ingress on ``--host:--port`` and blocks. Every replica loads the same base and adapters
(the ``launch.serve`` flags of the same names). Needs ``pip install 'ray[serve]'``.
"""

from __future__ import annotations

import logging
import os
import time

from absl import app, flags

from icarus_jax.flag_utils import dataclass_from_flags, define_dataclass_flags
from icarus_jax.serving.engine_config import EngineConfig

FLAGS = flags.FLAGS
flags.DEFINE_integer("replicas", 2, "Engine replicas (one per device set).")
flags.DEFINE_enum("router", "context", ["context", "model", "pow2"], "Routing policy: context "
                  "(shared-context affinity, any model), model (Ray's multiplexed model affinity, "
                  "the conventional multi-LoRA choice), pow2 (Ray's default).")
flags.DEFINE_integer("imbalance", 4, "context router: skip the context's replica when its queue "
                     "is this many requests longer than the least loaded one.")
flags.DEFINE_string("address", None, "Ray cluster address (default: start a local one).")
flags.DEFINE_float("replica_gpus", 0.0, "GPUs per replica (Ray resource).")
flags.DEFINE_float("replica_cpus", 1.0, "CPUs per replica (Ray resource).")
flags.DEFINE_string("base", None, "Base (as launch.serve --base).")
flags.DEFINE_list("adapters", None, "Adapters (as launch.serve --adapters).")
flags.DEFINE_string("base_name", "base", "Model name of the base in the API.")
flags.DEFINE_string("api_key", None, "Require 'Authorization: Bearer <key>' on /v1 routes.")
flags.DEFINE_string("host", "127.0.0.1", "Bind address of the ingress.")
flags.DEFINE_integer("port", 8000, "Port of the ingress.")
define_dataclass_flags(EngineConfig, defaults={"num_pages": 512, "max_batch": 32,
                                               "max_adapters": 16},
                       aliases={"kv_pages": "num_pages"})


def main(_):
  import ray
  from ray import serve

  from icarus_jax.serving.ray_app import build_app
  from icarus_jax.serving.server_builder import ServerSpec
  logging.basicConfig(level=logging.INFO)
  ray.init(address=FLAGS.address)
  serve.start(http_options={"host": FLAGS.host, "port": FLAGS.port})
  spec = ServerSpec(base=FLAGS.base, adapters=FLAGS.adapters,
                    engine=dataclass_from_flags(EngineConfig), base_name=FLAGS.base_name,
                    api_key=FLAGS.api_key or os.environ.get("ICARUS_API_KEY") or None)
  serve.run(build_app(spec, num_replicas=FLAGS.replicas, router=FLAGS.router,
                      imbalance=FLAGS.imbalance,
                      replica_options={"ray_actor_options": {"num_gpus": FLAGS.replica_gpus,
                                                             "num_cpus": FLAGS.replica_cpus}}),
            name="icarus", route_prefix="/")
  print(f"serving on http://{FLAGS.host}:{FLAGS.port} ({FLAGS.replicas} replicas, router="
        f"{FLAGS.router})", flush=True)
  while True:
    time.sleep(3600)


if __name__ == "__main__":
  app.run(main)
