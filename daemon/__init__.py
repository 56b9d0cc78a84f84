"""gpuwatch.daemon: the composition root: configuration, wiring, lifecycle and the control socket's
commands."""
