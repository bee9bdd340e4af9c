"""Starting or joining Ray: the one place every Strata command does it.

``RAY_ADDRESS`` (or the address given) joins a running cluster; without one, Ray starts a private
local instance. A Ray that Strata starts is told to be patient with a busy node: on a small
machine (two cores, several actors running a model) the raylet can miss Ray's default health
checks (five misses of a 10 s probe) and is then declared dead, which ends the run with "the node
it was running on is dead" although nothing died; a worker process slower than 60 s to start is
killed and started again. A raylet that has really crashed fails its probes at once (connection
refused), so the longer patience costs nothing there; on a multi-node cluster the cluster's own
settings apply, which Strata never changes.
"""

from __future__ import annotations

import logging
import os

# Ray's RayConfig reads ``RAY_<name>`` from the environment of every process it starts; a setting
# the user already exported wins (``setdefault``).
PATIENT_HEALTH_CHECKS = {
    "RAY_health_check_timeout_ms": "30000",
    "RAY_health_check_failure_threshold": "20",
    "RAY_worker_register_timeout_seconds": "300",
}


def patient_health_checks() -> None:
    """Ray clusters started from this process after the call tolerate a node busy for minutes."""
    for key, value in PATIENT_HEALTH_CHECKS.items():
        os.environ.setdefault(key, value)


def connect(address: str | None = None):
    """The ``ray`` module, initialised: joins ``address`` or ``RAY_ADDRESS``, else starts a local
    Ray; a Ray already initialised in this process is used as it is. Workers' output stays in Ray's
    session logs (``log_to_driver=False``): task failures still reach the driver as exceptions."""
    import ray

    if not ray.is_initialized():
        patient_health_checks()
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
                 logging_level=logging.WARNING, log_to_driver=False, configure_logging=True,
                 ignore_reinit_error=True)
        from .errors import reinstall_sigterm

        reinstall_sigterm()  # ray.init replaced the CLI's SIGTERM handler (clean stop, exit 143)
    return ray
