"""Run ``fedgap doctor`` and SIGKILL it at a named point (tests/test_nothing_lost.py):

    python tests/doctor_kill.py POINT [doctor arguments...]

POINT is ``rung`` (the first rung, once two of its runs have finished and others are training), ``between-rungs``
(the first rung done, the second not started), ``combination`` (the combination step, once one of its runs has
finished) or ``outputs`` (gap.csv written, recommended.yaml and summary.json not). The kill is the real thing: the
process ends with SIGKILL, no handler runs, the pool's workers die with it.
"""

from __future__ import annotations

import os
import signal
import sys

from fedgap.cli import main
from fedgap.diagnose import doctor
from fedgap.diagnose import outputs as doctor_outputs
from fedgap.experiment import outputs
from fedgap.runs import pool


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def killing_runner(point: str):
    calls = 0

    def pool_runner(out, jobs, show_progress, threads=None):
        def run(specs, title):
            nonlocal calls
            calls += 1
            if point == "between-rungs" and calls == 2:
                die()
            done = 0

            def on_done(record) -> None:
                nonlocal done
                done += 1
                if (point == "rung" and calls == 1 and done == 2) or \
                        (point == "combination" and "combination" in title and done == 1):
                    die()

            return pool.run_all(specs, out, jobs=jobs, threads=threads, title=title, show_progress=show_progress,
                                on_done=on_done)

        return run

    return pool_runner


def dying_write_outputs(res) -> None:
    outputs.atomic_write_text(res.out / "gap.csv", doctor_outputs.gap_csv(res.rows))
    die()


if __name__ == "__main__":
    point, args = sys.argv[1], sys.argv[2:]
    doctor.pool_runner = killing_runner(point)
    if point == "outputs":
        doctor.write_outputs = dying_write_outputs
    main(["doctor", *args])
    sys.exit(f"the doctor finished without reaching the kill point {point!r}")
