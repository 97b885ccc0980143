"""`python -m memdb_server` runs the server (same as the `memdb-server` console script)."""

from memdb_server.server import main

main()
