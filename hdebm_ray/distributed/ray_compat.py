"""Every place we reach into Ray's private internals, in one module, behind a check of Ray's version.

Both workarounds were written against Ray 2.60 and rely on its private layout; on any other Ray they may be
wrong in silence, so ``check_ray_version`` refuses one (``HDEBM_RAY_ALLOW_UNTESTED_RAY=1`` runs anyway, with a
warning) and each workaround checks again before it touches an internal.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from importlib.metadata import version as installed_version

TESTED_RAY = "2.60"  # major.minor the workarounds below were written and tested against
ALLOW_ENV = "HDEBM_RAY_ALLOW_UNTESTED_RAY"


class UntestedRayError(RuntimeError):
    """The installed Ray is not the one our use of its internals was tested on."""


def check_ray_version(version: str | None = None) -> None:
    """Raise ``UntestedRayError`` unless Ray is ``TESTED_RAY``.x (or ``$HDEBM_RAY_ALLOW_UNTESTED_RAY`` is set)."""
    version = version or installed_version("ray")  # without importing Ray: the CLI checks before it starts it
    if version == TESTED_RAY or version.startswith(TESTED_RAY + "."):
        return
    message = (
        f"hdebm_ray works around two Ray {TESTED_RAY} internals (distributed/ray_compat.py) and Ray {version} is "
        f"installed: install ray=={TESTED_RAY}.* (pyproject.toml pins it), or set {ALLOW_ENV}=1 to try anyway"
    )
    if os.environ.get(ALLOW_ENV):
        warnings.warn(message, stacklevel=2)
        return
    raise UntestedRayError(message)


def quiet_train_report_log() -> None:
    """Ray Train 2.60 logs every report's full metrics dict at INFO from a logger named by its file path (outside
    the ``ray.train`` hierarchy, so LoggingConfig does not reach it); our one-line status per tick says enough."""
    check_ray_version()
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def wait_for_forwarded_reports(timeout_s: float = 120.0) -> None:
    """Return from a Tune trial only once Tune has taken every report ``TuneReportCallback`` forwarded.

    Ray 2.60 race (seen as a trial stuck RUNNING forever): the callback forwards the Train run's reports through a
    one-slot actor queue that the trial's main thread drains one per Tune step; if the driver function returns
    while a report is still in that queue, its end-of-trial result fills the one-slot result queue first, and the
    main thread then blocks forever putting the forwarded report behind it.
    """
    check_ray_version()
    from ray.train._internal.session import get_session

    session = get_session()
    forwarded = getattr(session, "_inter_actor_queue", None)
    if forwarded is None:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not (forwarded.empty() and session.result_queue.empty()):
        time.sleep(0.1)
    time.sleep(0.5)  # the main thread may be between taking the last report and queueing it
