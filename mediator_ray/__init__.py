"""mediator-ray: merge fine-tuned LLM experts into one Mediator checkpoint on Ray, and serve it."""

__version__ = "0.1.0"
