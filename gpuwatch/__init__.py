"""gpuwatch: watch, limit and share NVIDIA GPUs between processes.

The layers, one way (tests/test_architecture.py holds them): core <- probes, interposer <- enforcer <- daemon
-> exporters; the client reaches the daemon through the control protocol (core/protocol.py) only."""
