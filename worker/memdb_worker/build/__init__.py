"""memdb_worker.build: making memories from prefix text with a model.

Owns calibration (the prefix KV and the traces' queries and exact states on it: `calibration`),
the fit of fitted rows (`fitting`), the builder that turns a calibration into a memory's shards
(`builder`: fitted rows by default, or the paper's clustered entries), appending a chunk of text
to a stored memory (`append`) and the in-process build that `memdb-admin --local` runs
(`local`). The options of a build are `memdb.build_options.BuildOptions` (the wire layer, so the
CLI and the server read them without torch).

Knows nothing of serving, HTTP or the server beyond the shard format.
"""

from memdb.build_options import BuildOptions
from memdb_worker.build.append import Appended, append_chunk
from memdb_worker.build.builder import BuiltMemory, build_memory, cluster
from memdb_worker.build.calibration import Calibration, calibrate

__all__ = [
    "Appended", "BuildOptions", "BuiltMemory", "Calibration", "append_chunk", "build_memory",
    "calibrate", "cluster",
]  # fmt: skip
