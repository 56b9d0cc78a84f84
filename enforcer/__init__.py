"""gpuwatch.enforcer: policy and rules, quotas, the ledger, the scheduler and its loop, the movers (pause,
swap, stop), and the one view they and everyone else read."""
