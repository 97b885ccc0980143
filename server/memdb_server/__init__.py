"""memdb_server: the attention-state memory server.

Owns the server side: LMDB storage, FAISS indices, the gRPC services, auth, metrics and the
cluster backend (etcd + Redis Cluster). It imports no torch. It speaks the wire layer of the
`memdb` package (stubs, errors, shard format, tensor encoding), which the client and the worker
import too; neither of them imports this package.
"""

from memdb import __version__

__all__ = ["__version__"]
