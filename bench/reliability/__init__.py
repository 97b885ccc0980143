"""The reliability campaign of the memory server (`python -m bench.reliability [--quick]`).

Parts, one module each: kills (kill -9 during writes, at random moments and at the failpoints
of memdb_server.failpoints), history (every answer of concurrent Lookup / FetchMemory comes from one
version current during the call), fuzz (hypothesis over every request type, raw bytes,
malformed safetensors), isolation (tenants over random interleavings), neighbours (one tenant's
load against another's p99) and soak (p99 and memory over time). `memories` makes the small
version-tagged memories they write; `measure` holds the shared measurements. Every part runs
against real server processes on 127.0.0.1 and every loop is bounded in count and time.
"""
