"""gpuwatch.probes: eBPF uprobes on libcuda and the per-process accounting they produce."""
from .model import Event, EventType, Kind, ProbeFacts, ProbeRow
from .preflight import PreflightError
from .tracer import LaunchMode, Tracer

__all__ = ["Event", "EventType", "Kind", "LaunchMode", "PreflightError", "ProbeFacts", "ProbeRow", "Tracer"]
