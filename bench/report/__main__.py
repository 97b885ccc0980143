"""`python -m bench.report [--check]`: write bench/RESULTS.md (and the README's results summary
between its markers) from bench/results/*.json, or exit 1 when the committed files differ from
what would be written."""

from __future__ import annotations

import argparse
import sys

from bench.report.document import README_MD, RESULTS_MD, render
from bench.report.headlines import with_headlines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a written file is stale")
    args = ap.parse_args(argv)
    fresh = {RESULTS_MD: render(), README_MD: with_headlines(README_MD.read_text())}
    stale = [p for p, text in fresh.items() if not p.exists() or p.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path} is stale: run python -m bench.report", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.write_text(fresh[path])
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
