"""`gpuwatch run`: the configuration (file, then the command line's options), the tracer and the daemon."""
from __future__ import annotations

import argparse
import os
import sys

from ..probes import PreflightError, Tracer
from ..probes.preflight import check_privileges
from ..probes import program
from . import config as configuration
from .daemon import Daemon, StartError


def run_configuration(args: argparse.Namespace) -> configuration.Config:
    """The file (or the defaults) with the command line's options on top: at start and at every SIGHUP."""
    cfg = configuration.with_overrides(
        configuration.load(args.config),
        daemon={"socket": args.socket and os.path.abspath(args.socket), "launches": args.launches,
                "nvml": False if args.no_nvml else None, "ring_buffer_pages": args.ring_buffer_pages,
                "sample_window_ms": args.sample_window_ms, "sample_period_ms": args.sample_period_ms},
        metrics={"listen": args.listen, "enabled": False if args.no_metrics else None})
    d = cfg.daemon
    if d.sample_window_ms >= d.sample_period_ms:
        raise configuration.ConfigError(f"the sample window ({d.sample_window_ms} ms) must be shorter than its "
                                        f"period ({d.sample_period_ms} ms)")
    return cfg


def main(args: argparse.Namespace) -> int:
    try:
        if args.ebpf:
            print(program.print_program())
            return 0
        check_privileges()
        cfg = run_configuration(args)
    except (PreflightError, configuration.ConfigError) as exc:
        print(f"gpuwatch: {exc}", file=sys.stderr)
        return 1
    d = cfg.daemon
    tracer = Tracer(launches=d.launches, use_nvml=d.nvml, ring_buffer_pages=d.ring_buffer_pages,
                    sample_window=d.sample_window_ms / 1000, sample_period=d.sample_period_ms / 1000)
    listen = configuration.parse_listen(cfg.metrics.listen) if cfg.metrics.enabled else None
    try:
        Daemon(tracer, d.socket, listen, cfg.interposer, cfg.scheduler, config=cfg,
               reload=lambda: run_configuration(args)).run()
    except PreflightError as exc:
        print(f"gpuwatch: {exc}", file=sys.stderr)
        return 1
    except StartError as exc:  # what had started was stopped again (Daemon.run)
        print(f"gpuwatch: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0
