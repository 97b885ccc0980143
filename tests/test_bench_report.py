"""bench/RESULTS.md is what `python -m bench.report` writes from bench/results/*.json, and its
figures are the JSON's."""

from __future__ import annotations

import json

from bench.report import render
from bench.report.__main__ import main
from bench.report.document import README_MD, RESULTS_MD
from bench.report.headlines import with_headlines
from bench.report.sources import RESULTS, describe


def _row(text: str, start: str) -> list[str]:
    """The cells of the first table row of `text` that starts with `start`."""
    line = next(x for x in text.splitlines() if x.startswith(start))
    return [c.strip() for c in line.strip("|").split("|")]


def test_committed_results_md_is_a_fresh_generation():
    assert RESULTS_MD.read_text() == render(), (
        "bench/RESULTS.md is stale: run python -m bench.report and commit the result"
    )


def test_the_readme_results_summary_is_fresh_and_from_the_json():
    text = README_MD.read_text()
    assert text == with_headlines(text), (
        "README.md's results summary is stale: run python -m bench.report and commit the result"
    )
    summary = " ".join(
        text.split("<!-- results:begin -->")[1].split("<!-- results:end -->")[0].split()
    )
    cluster = json.loads((RESULTS / "cluster.json").read_text())
    assert f"3 nodes serve {cluster['speedup_3_vs_1']:.2f}x the Lookups of one" in summary
    assert "device tool" not in text


def test_server_and_quality_figures_are_their_json_values():
    text = RESULTS_MD.read_text()
    server = json.loads((RESULTS / "server.json").read_text())
    (cell,) = [x for x in server["lookup"] if (x["M"], x["dk"], x["batch"]) == (8192, 64, 64)]
    row = _row(text, "| 8192 | 64 | 64 |")
    assert row[3] == f"{cell['p50_ms']:.2f}" and row[4] == f"{cell['p99_ms']:.2f}"
    assert row[5] == f"{cell['vectors_per_s']:,.0f}"
    assert row[6] == f"{cell['inprocess_p50_ms']:.2f}"
    quality = json.loads((RESULTS / "quality.json").read_text())["datasets"]["trec"]
    row = _row(text, "| trec | 210 | ")  # the first such row: SmolLM2's count-equal table
    assert row[10].startswith(f"{quality['memory']['4096']:.3f} ± ")
    assert row[9].startswith(f"{quality['icl']['4096']:.3f} ± ")


def test_check_fails_on_a_stale_file(tmp_path, monkeypatch, capsys):
    stale, readme = tmp_path / "RESULTS.md", tmp_path / "README.md"
    readme.write_text(README_MD.read_text())
    monkeypatch.setattr("bench.report.__main__.RESULTS_MD", stale)
    monkeypatch.setattr("bench.report.__main__.README_MD", readme)
    assert main(["--check"]) == 1  # missing
    stale.write_text(render().replace("| 8192 | 64 | 64 |", "| 8192 | 64 | 65 |"))
    assert main(["--check"]) == 1
    assert "run python -m bench.report" in capsys.readouterr().err
    assert main([]) == 0 and main(["--check"]) == 0
    readme.write_text(README_MD.read_text().replace("3 nodes serve", "3 nodes served"))
    assert main(["--check"]) == 1


def test_machines_are_named_by_card_and_cores():
    assert describe("x86_64, 2 cores, Linux 6.18, Python 3.11.7") == "x86_64, 2 CPU cores"
    assert (
        describe("x86_64 32 cores, torch 2.11.0+cu130, 8 threads, NVIDIA H200")
        == "NVIDIA H200, 32 CPU cores"
    )
    assert (
        describe("NVIDIA H100 80GB HBM3 via a tool (16 host cores, torch 2.11.0+cu130)")
        == "NVIDIA H100 80GB HBM3, 16 CPU cores"
    )
