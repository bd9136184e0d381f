"""Checkpoint formats: Hugging Face safetensors (``hf``), PEFT adapters (``peft_io``), Orbax
(``orbax_io``), llama.cpp GGUF (``gguf_io``), and resolution of named and embedded bases
(``assets``). Imports only ``model`` and ``errors``; orbax and gguf are imported lazily, inside
the functions that need them."""
