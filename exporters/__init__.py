"""gpuwatch.exporters: Prometheus metrics and `gpuwatch top` (they only read the probes' model)."""
