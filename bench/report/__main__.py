"""`python -m bench.report [--check]`: write bench/RESULTS.md from bench/results/*.json, or
exit 1 when the committed file differs from what would be written."""

from __future__ import annotations

import argparse
import sys

from bench.report.document import RESULTS_MD, render


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if bench/RESULTS.md is stale")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        if not RESULTS_MD.exists() or RESULTS_MD.read_text() != text:
            print(f"{RESULTS_MD} is stale: run python -m bench.report", file=sys.stderr)
            return 1
        return 0
    RESULTS_MD.write_text(text)
    print(f"wrote {RESULTS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
