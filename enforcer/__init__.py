"""gpuwatch.enforcer: the daemon, its control socket, and (later) policy, quotas and scheduling."""
