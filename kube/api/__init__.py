"""The kubelet's gRPC APIs: the .proto files (written from the upstream reference) and the Python code that
grpcio-tools generates from them (`make -C kube/api`; committed)."""
