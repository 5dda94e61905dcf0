"""Spectral monitoring during training: the RMT summary of every weight matrix, every N steps.

::

    from laserrmt.monitor import SpectralMonitorCallback
    trainer = Trainer(..., callbacks=[SpectralMonitorCallback("runs/x", every=100)])
    # then: laserrmt monitor runs/x   -> runs/x/report.html and runs/x/advice_plan.json

:mod:`~laserrmt.monitor.hook` records (plain loop: ``SpectralMonitor.step(model, step)``),
:mod:`~laserrmt.monitor.summary` turns one spectrum into its record,
:mod:`~laserrmt.monitor.run` reads a run back (events, compression advice) and
:mod:`~laserrmt.monitor.report` renders it.
"""

from laserrmt.monitor.hook import (
    DEFAULT_EVERY,
    PLAN_FILE,
    RECORDS_FILE,
    SpectralMonitor,
    SpectralMonitorCallback,
)
from laserrmt.monitor.report import REPORT_FILE, render_report, watch
from laserrmt.monitor.run import EVENT_KINDS, MonitorRun, advice_plan, detect_events, read_run

__all__ = [
    "DEFAULT_EVERY",
    "EVENT_KINDS",
    "PLAN_FILE",
    "RECORDS_FILE",
    "REPORT_FILE",
    "MonitorRun",
    "SpectralMonitor",
    "SpectralMonitorCallback",
    "advice_plan",
    "detect_events",
    "read_run",
    "render_report",
    "watch",
]
