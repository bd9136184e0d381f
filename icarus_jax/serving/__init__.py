"""Serving: the engine and its parts (scheduler state in ``engine``, paged K/V in
``page_allocator`` / ``prefix_cache``, device steps in ``engine_steps`` / ``runner``, the adapter
pool, sampling, stop strings), the asyncio loop and the OpenAI-compatible server, and the naive
full-recompute ``reference`` the engine is tested against. Imports ``model``, ``checkpoints``
(lazily, to load adapters by path) and ``errors``; never ``training``."""
