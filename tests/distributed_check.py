"""Two processes on loopback join one jax.distributed runtime and run one sharded step.

    python tests/distributed_check.py <process_id> <port>
Each process owns 2 CPU devices; the (data:1, model:4) mesh spans both processes. Prints one
JSON line with the step's logits checksum (identical in both processes) and device counts.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from icarus_jax.model.sharding import make_mesh, maybe_initialize_distributed, shard_base  # noqa: E402


def main():
  pid, port = int(sys.argv[1]), int(sys.argv[2])
  maybe_initialize_distributed(f"127.0.0.1:{port}", 2, pid)
  from icarus_jax import init_base_params, tiny_config
  from icarus_jax.model.transformer import single_stream
  cfg = tiny_config(num_heads=4, num_kv_heads=4, head_dim=16, mlp_dim=128)
  base = init_base_params(cfg, jax.random.key(0), scale=0.1)  # same on both processes
  mesh = make_mesh("data:1,model:4")
  sb = shard_base(cfg, base, mesh)
  toks = np.arange(24, dtype=np.int32).reshape(2, 12) % cfg.vocab_size
  pos = np.broadcast_to(np.arange(12, dtype=np.int32), (2, 12))
  rep = NamedSharding(mesh, P())
  toks_g = jax.make_array_from_callback(toks.shape, rep, lambda idx: toks[idx])
  pos_g = jax.make_array_from_callback(pos.shape, rep, lambda idx: pos[idx])
  fwd = jax.jit(lambda b, t, p: single_stream(cfg, b, {"layers": {}}, t, p, None, True)[0],
                out_shardings=rep)
  logits = fwd(sb, toks_g, pos_g)
  local = np.asarray(logits.addressable_data(0))
  print("RESULT " + json.dumps({
      "process_id": jax.process_index(), "process_count": jax.process_count(),
      "global_devices": len(jax.devices()), "local_devices": len(jax.local_devices()),
      "q_sharding": str(sb["layers"]["q"].sharding.spec),
      "checksum": float(np.abs(local).sum()), "first": local[0, 0, :3].tolist()}), flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
