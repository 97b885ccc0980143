"""The worker's public API: what each package's `__init__` exports resolves, `import
memdb_worker` stays light, and the README's example (a memory fetched from a real server, then
`bind` around `model.generate`) runs as written and decodes what in-context learning does."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SUBPACKAGES = ("memory", "attend", "model", "build", "serve")
PACKAGES = ["memdb_worker", *(f"memdb_worker.{p}" for p in SUBPACKAGES)]
ROOT_KEY = "test-root-key"


@pytest.mark.parametrize("package", PACKAGES)
def test_every_exported_name_resolves(package):
    mod = importlib.import_module(package)
    assert mod.__all__, f"{package} exports nothing"
    missing = [n for n in mod.__all__ if getattr(mod, n, None) is None]
    assert not missing, f"{package}.__all__ names {missing}, which do not resolve"
    doc = " ".join((mod.__doc__ or "").split()).lower()
    if package != "memdb_worker":  # each package says what it owns and what it does not know
        assert "owns" in doc and "knows nothing" in doc, f"{package}'s docstring"


def test_importing_the_worker_package_loads_no_torch():
    code = "import sys, memdb_worker; assert 'torch' not in sys.modules, 'torch loaded'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    marker = text.index("<!-- generate-example -->")
    block = re.search(r"```python\n(.*?)```", text[marker:], re.S)
    assert block, "README: no python block after <!-- generate-example -->"
    return block.group(1)


@pytest.mark.model
def test_readme_generate_example_decodes_like_the_prefix_in_the_prompt(
    smollm2, tmp_path, monkeypatch
):
    """Rows fitted at M = N with float32 keys are the prefix KV itself, so greedy decoding
    under `bind` must give the tokens of the prefix text in the prompt."""
    import memdb_worker
    import memdb_worker.model
    from memdb_client import MemdbClient
    from memdb_server.config import ServerConfig
    from memdb_server.server import run_server
    from memdb_worker import BuildOptions, build_memory, model_fingerprint

    model, tok = smollm2
    code = readme_example()
    prefix = re.search(r'# prefix text: "(.*)"', code).group(1).replace("\\n", "\n")
    prompt = re.search(r'tokenizer\(\s*"(.*?)"', code, re.S).group(1).replace("\\n", "\n")
    name = re.search(r'fetch_memory\(\s*"([\w-]+)"', code).group(1)
    prefix_ids = list(tok(prefix).input_ids)
    traces = ["Question: Who wrote it?\nType: human", "Question: When?\nType: number"]
    opts = BuildOptions(key_dtype="float32", out_dtype="float32")
    built = build_memory(model, tok, prefix, traces, len(prefix_ids), opts, progress=False)

    cfg = ServerConfig(data_dir=tmp_path / "data", listen="127.0.0.1:0", metrics_listen="",
                       admin_key=ROOT_KEY)  # fmt: skip
    with run_server(cfg) as server:
        with MemdbClient(server.address, ROOT_KEY) as root:
            root.put_prefix(name, built.shards, model_fingerprint=model_fingerprint(model),
                            token_count=built.token_count, mode="upsert")  # fmt: skip
        monkeypatch.setenv("MEMDB_SERVER", server.address)
        monkeypatch.setenv("MEMDB_API_KEY", ROOT_KEY)
        # the session's model stands in for the example's second load of the same model
        monkeypatch.setattr(memdb_worker.model, "load_model", lambda *a, **k: smollm2)
        monkeypatch.delattr(memdb_worker, "load_model", raising=False)
        scope: dict = {}
        with torch.inference_mode():
            exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own code

    ids = torch.tensor([prefix_ids + list(tok(prompt, add_special_tokens=False).input_ids)])
    start = scope["prompt"].input_ids.shape[1]
    new = scope["out"][0, start:]
    assert len(new) >= 1, "the example generated nothing"
    with torch.inference_mode():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=len(new))  # fmt: skip
    assert new.tolist() == ref[0, ids.shape[1] :].tolist()
