"""memdb: the attention-state memory server.

This package owns the server side: LMDB storage, FAISS indices, the gRPC services, auth and
metrics. It imports no torch. The wire stubs (`memdb.v1`), the shard format (`memdb.shards`),
tensor encoding (`memdb.wire`) and the error hierarchy (`memdb.errors`) need only numpy,
protobuf, grpcio and safetensors, so the client and the worker share them.
"""

__version__ = "0.1.0"
