"""gpuwatch.probes: eBPF uprobes on libcuda and the per-process accounting they produce."""
from .model import Event, EventType, Gpu, Kind, ProcessGpu, Snapshot, TracerHealth
from .preflight import PreflightError
from .tracer import LaunchMode, Tracer

__all__ = ["Event", "EventType", "Gpu", "Kind", "LaunchMode", "PreflightError", "ProcessGpu", "Snapshot",
           "Tracer", "TracerHealth"]
