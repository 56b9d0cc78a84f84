"""gpuwatch.client: the `gpuwatch` command; it reaches the daemon through the control protocol only."""
