"""Benchmarks of whole systems: agent-shaped workloads (``workload``), the workflow harness
(``harness``), latency metrics and the N-instance conventional baseline (``multi_instance``).
Imports ``serving``, ``checkpoints``, ``model`` and ``errors``."""
