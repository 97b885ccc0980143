"""The cluster fault campaign (issue 23): real etcd, Redis and memdb-server processes, a TCP
proxy between each node and etcd (proxy), the system and its restarts (testbed), the faults
(faults), the clients' load and history (load), the final read of everything published
(published), the history checker (checker) and the campaign that runs them (campaign);
`python -m bench.cluster_faults`."""
