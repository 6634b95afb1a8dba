"""`headwater serve --workers N`: N server processes sharing the API port (SO_REUSEPORT) and the bus,
so that one machine's cores all serve; this process supervises them and restarts one that dies."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from router.config import Config, ConfigError

log = logging.getLogger("headwater")

# Buses whose events a second process can consume: not `memory`, which lives inside one process.
SHARED_BUSES = ("rabbitmq", "nats", "sqlite")
WORKER_ENV = "HEADWATER_WORKER"  # set in each worker: its index; the supervisor is the process without it
RESTART_BACKOFF = (0.5, 1, 2, 5, 10)  # seconds before restarting a worker that died, by deaths in a row
HEALTHY_SECONDS = 60.0  # a worker that served this long before dying starts the backoff afresh
_PR_SET_PDEATHSIG = 1


def check(config: Config, workers: int) -> None:
    """Refuse set-ups that several processes cannot share, naming the option at fault."""
    if workers < 1:
        raise ConfigError(f"[api] workers = {workers}: must be at least 1")
    if workers > 1 and config.bus.backend not in SHARED_BUSES:
        raise ConfigError(f"[api] workers = {workers} needs a bus that processes share ([bus] backend = "
                          f"{' or '.join(SHARED_BUSES)}); [bus] backend = {config.bus.backend} lives in one process")


def _die_with_supervisor() -> None:
    # A worker must not outlive a supervisor that was killed: nobody would stop it.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class Supervisor:
    """Starts the workers, restarts one that exits unasked (with a growing backoff), and stops them
    all on SIGTERM/SIGINT. Returns the exit status: 0 after a requested stop, 2 after a worker's
    configuration error."""

    def __init__(self, argv: Sequence[str], workers: int, *, clock=time.monotonic, sleep=time.sleep):
        self.argv = list(argv)
        self.count = workers
        self.clock, self.sleep = clock, sleep
        self.procs: dict[int, subprocess.Popen] = {}
        self.started: dict[int, float] = {}
        self.deaths: dict[int, int] = {}
        self.stopping = False
        self.status = 0

    def _spawn(self, index: int) -> None:
        env = {**os.environ, WORKER_ENV: str(index)}
        self.procs[index] = subprocess.Popen(self.argv, env=env, preexec_fn=_die_with_supervisor)
        self.started[index] = self.clock()
        log.info("worker started", extra={"worker": index, "pid": self.procs[index].pid})

    def _stop(self, signum, frame) -> None:
        self.stopping = True
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        for index in range(self.count):
            self._spawn(index)
        log.info("headwater serving with %d worker processes", self.count, extra={"pids": [p.pid for p in self.procs.values()]})
        while True:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                return self.status
            except InterruptedError:
                continue
            index = next((i for i, p in self.procs.items() if p.pid == pid), None)
            if index is None:
                continue
            self.procs[index].returncode = os.waitstatus_to_exitcode(status)
            if self.stopping:
                if all(p.poll() is not None for p in self.procs.values()):
                    return self.status
                continue
            code = self.procs[index].returncode
            if code == 2:  # a configuration error: every restart would fail the same way
                log.critical("worker %d stopped on a configuration error; stopping the others", index)
                self.status = 2  # as a single process would exit
                self._stop(None, None)
                self.stopping = True
                continue
            if self.clock() - self.started[index] > HEALTHY_SECONDS:
                self.deaths[index] = 0  # it had been serving: start again from the shortest backoff
            deaths = self.deaths[index] = self.deaths.get(index, 0) + 1
            delay = RESTART_BACKOFF[min(deaths, len(RESTART_BACKOFF)) - 1]
            log.error("worker %d (pid %d) exited with %s; restarting it in %g s", index, pid, code, delay)
            self.sleep(delay)
            if not self.stopping:
                self._spawn(index)


def is_worker() -> bool:
    """True in a process the supervisor started (it serves); False in the supervisor itself."""
    return WORKER_ENV in os.environ


def run(argv: Sequence[str], config: Config, workers: int) -> int:
    """Run this `headwater serve` command line (`argv`, without the program) as `workers` processes."""
    check(config, workers)
    return Supervisor([sys.executable, "-m", "router.cli", *argv], workers).run()
