"""Shared test set-up: offline, no auth, one Ray instance per module (see ``ray_local``)."""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "0")


@pytest.fixture(scope="module")
def ray_local():
    """A fresh embedded Ray for the test module; never `ray stop` (it would kill every Ray on the machine)."""
    import sys

    import ray
    import ray.cloudpickle

    # Ray workers cannot import test modules: ship the remote functions defined in them by value.
    here = os.path.dirname(os.path.abspath(__file__))
    for module in list(sys.modules.values()):
        if (getattr(module, "__file__", None) or "").startswith(here):
            ray.cloudpickle.register_pickle_by_value(module)
    ray.init(
        address="local",
        num_cpus=4,
        namespace="hdebm",
        log_to_driver=True,
        runtime_env={"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}},
    )
    yield ray
    ray.shutdown()


RAY_FIXTURES = {"ray_local", "two_nodes", "local_head"}


def pytest_collection_modifyitems(config, items):
    """Mark every test that starts Ray (through a Ray fixture, or a module that says so with ``pytestmark``) as
    ``ray``: ``pytest -m "not ray"`` runs the rest."""
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)


def pytest_sessionfinish(session, exitstatus):
    session.config.hdebm_exitstatus = int(exitstatus)


def pytest_unconfigure(config):
    """Leave without the interpreter's own teardown, keeping pytest's exit status: with Ray's and torch's threads
    still around it has crashed (SIGSEGV) after every test had passed and the summary was printed."""
    if hasattr(config, "hdebm_exitstatus"):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(config.hdebm_exitstatus)
