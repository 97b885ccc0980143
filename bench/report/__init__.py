"""bench/RESULTS.md, written from bench/results/*.json: `python -m bench.report` writes it,
`python -m bench.report --check` fails when the committed file differs from a fresh one.

Owns the document: its sections, their order, the prose that explains the tables (the team's
findings) and the line under each table naming the command, the machine (card and CPU cores)
and the JSON it comes from. Every number in a table is read from the JSON here; nothing is
measured. Knows nothing of how a benchmark measures (the bench modules do); the quality tables
are `bench.quality.summary`'s.
"""

from bench.report.document import render

__all__ = ["render"]
