"""Fine-tuning and pretraining: the objective and jitted steps (``objective``), the checkpointed
loop (``trainer``), one-call fine-tuning (``finetune``), data and tasks (``data``, ``tasks``,
``tfds_tasks``, ``corpus``) and the accuracy tables' records (``accuracy_report``). Imports
``model``, ``checkpoints`` and ``errors``; never ``serving``."""
