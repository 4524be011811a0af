from __future__ import annotations

import os

if os.environ.pop("RINGFENCE_START_IDLE", None):
    # A warm spare starts at idle priority: its start-up takes only CPU that the running
    # domains leave, so that starting one never slows them; it gets normal priority back
    # when it takes over (toolstack/system.py).
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))

from ringfence.cli import main  # noqa: E402  (after the priority: the imports are the cost)

raise SystemExit(main())
