"""`python -m memdb` runs the server (same as the `memdb-server` console script)."""

from memdb.server import main

main()
