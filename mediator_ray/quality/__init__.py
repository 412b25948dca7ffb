"""The quality benchmark: generated tasks, CPU fine-tuning, a tiny trained expert zoo, and the
evaluation of every merge method against the experts (``benchmarks/quality.py``,
``mediator-ray demo``). Submodules are imported on use: they pull in torch and transformers."""
