"""Several worker processes (`authproxy serve --workers N`): the supervisor.

With N > 1 the `serve` process checks the configuration exactly as a single proxy would
(every problem is the usual one-line error, before any worker starts), then starts N
workers: its own command line again (`python -m authproxy serve ... --worker-index I`), each a
whole proxy with its own event loop, `AuthProxy` and connections. Every worker opens the
same sidecar and ext_authz ports with SO_REUSEPORT, so the kernel spreads new connections
over them; worker I serves its admin API on the admin port + I (worker 0 on the port
given, so probes pointed at it keep working). Revocations, single-use tokens and rate
limits must be shared, so N > 1 needs `--redis`.

The supervisor forwards SIGTERM, SIGINT (the workers drain for the grace period) and
SIGHUP (policy reload) to every worker, and exits 0 once they are gone. A worker that
exits on its own is a failure: the supervisor stops the others (SIGTERM, SIGKILL after
the grace period + 5 s) and exits non-zero, so the orchestrator restarts the whole
process. A worker whose supervisor is gone (its stdin, a pipe from the supervisor, ends)
shuts down by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import logging
import os
import signal
import stat
import sys
from collections.abc import Callable

from authproxy.runtime.config import ConfigError, ServeConfig
from authproxy.runtime.serve import check, run

log = logging.getLogger("authproxy.workers")

#: How long past the grace period the supervisor waits before it kills a worker.
KILL_AFTER_GRACE = 5.0


#: The configuration a `serve` command's arguments (after the word `serve`) make.
ConfigOf = Callable[[list[str]], ServeConfig]


def main(cfg: ServeConfig, worker_index: int | None, config_of: ConfigOf) -> int:
    """`authproxy serve` with `--workers` above 1 (the supervisor), or as worker
    `worker_index` of such a supervisor. The exit status. `config_of` is the command
    line's own reading of `serve` arguments (the supervisor checks that its command line
    makes `cfg` again before it starts workers with it)."""
    if worker_index is not None:
        return serve_worker(cfg, worker_index)
    return asyncio.run(supervise(cfg, config_of))


def check_workers(cfg: ServeConfig) -> None:
    """What several workers need beyond a valid configuration: fixed ports, admin ports
    for all of them, shared state. The addresses are already checked (`serve.check`)."""
    n = cfg.workers
    if n < 1:
        raise ConfigError(f"--workers {n}: expected 1 or more")
    if n == 1:
        return
    listeners = (
        ("--listen", cfg.listen if cfg.upstream else None),
        ("--ext-authz-grpc", cfg.ext_authz_grpc),
        ("--ext-authz-http", cfg.ext_authz_http),
        ("--admin", cfg.admin),
    )
    any_port = [f"{flag} {value}" for flag, value in listeners if value and _port(value) == 0]
    if any_port:
        raise ConfigError(
            f"--workers {n} needs fixed ports: {', '.join(any_port)} would be another free"
            " port in each worker"
        )
    if cfg.admin and _port(cfg.admin) + n - 1 > 65535:
        raise ConfigError(
            f"--workers {n}: worker I serves its admin API on the --admin port + I, and"
            f" {_port(cfg.admin)} + {n - 1} is past 65535"
        )
    if cfg.redis is None:
        raise ConfigError(
            f"--workers {n} needs shared state: in memory, each worker would keep its own"
            " revocations, single-use tokens and rate limits (a revocation posted to one"
            " worker would not reach the others); give --redis URL, as for several replicas"
        )


def _port(address: str) -> int:
    return int(address.rpartition(":")[2])


# --- the supervisor -------------------------------------------------------------------------


async def supervise(cfg: ServeConfig, config_of: ConfigOf) -> int:
    await check(cfg)
    check_workers(cfg)
    return await Supervisor(cfg, command_line(cfg, config_of)).run()


def command_line(cfg: ServeConfig, config_of: ConfigOf) -> list[str]:
    """This process's `serve` arguments, which the workers are started with. They must
    make exactly `cfg` again: `main(argv)` called from another program does not have them
    in `sys.argv`."""
    argv = sys.argv[1:]
    again = None
    if argv[:1] == ["serve"]:
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # argparse's own complaint
                again = config_of(argv[1:])
        except (SystemExit, ConfigError, ValueError):
            again = None
    if again != cfg:
        raise ConfigError(
            "--workers starts each worker with this process's command line, which is not"
            " this serve command: run it as `authproxy serve` (or python -m authproxy serve)"
        )
    return argv


class Supervisor:
    """Starts the workers, forwards signals to them, and stops them all when one fails."""

    def __init__(self, cfg: ServeConfig, argv: list[str]) -> None:
        self.cfg = cfg
        self.argv = argv
        self.workers: list[asyncio.subprocess.Process] = []
        self.stopping: signal.Signals | None = None  # the signal that asked us to stop
        self.failed: int | None = None  # the exit status, once a worker failed
        self._kill_timer: asyncio.TimerHandle | None = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._signalled, sig)
        loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP)
        if self.cfg.admin:
            host, _, port = self.cfg.admin.rpartition(":")
            last = int(port) + self.cfg.workers - 1
            log.info(
                "starting %d workers; admin API on %s:%s-%d", self.cfg.workers, host, port, last
            )
        try:
            for index in range(self.cfg.workers):
                if self.stopping is not None or self.failed is not None:
                    break
                await self._start(index)
            await self._wait()
        finally:
            if self._kill_timer is not None:
                self._kill_timer.cancel()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        if self.failed is not None:
            return self.failed
        log.info("all workers stopped")
        return 0

    async def _start(self, index: int) -> None:
        command = [sys.executable, "-m", "authproxy", *self.argv, "--worker-index", str(index)]
        # Blocked signals are inherited: the worker holds a SIGHUP sent while it starts
        # until it can reload (`serve.run` unblocks it) instead of dying of it.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            # stdin: a pipe nobody writes to; the worker sees it end when we are gone.
            worker = await asyncio.create_subprocess_exec(*command, stdin=asyncio.subprocess.PIPE)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        self.workers.append(worker)
        log.info("worker %d started (pid %d)", index, worker.pid)
        if self.stopping is not None:  # asked to stop while this one was being started
            _send(worker, self.stopping)

    async def _wait(self) -> None:
        waits = {asyncio.ensure_future(w.wait()): i for i, w in enumerate(self.workers)}
        while waits:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                index = waits.pop(task)
                worker = self.workers[index]
                self._exited(index, worker)

    def _exited(self, index: int, worker: asyncio.subprocess.Process) -> None:
        code = worker.returncode
        assert code is not None
        if self.stopping is None and self.failed is None:
            log.error(
                "worker %d (pid %d) exited unexpectedly (%s); stopping the other workers",
                index,
                worker.pid,
                _status(code),
            )
            self.failed = code if code > 0 else 1
            self._stop(signal.SIGTERM)
        elif code != 0:
            log.warning("worker %d (pid %d) exited (%s)", index, worker.pid, _status(code))
        else:
            log.info("worker %d (pid %d) stopped", index, worker.pid)

    def _signalled(self, sig: signal.Signals) -> None:
        if self.stopping is None:
            log.info("%s: stopping %d workers", sig.name, len(self.workers))
            self.stopping = sig
        self._stop(sig)

    def _stop(self, sig: signal.Signals) -> None:
        """Send every running worker `sig`; kill the ones left after the grace period."""
        self._forward(sig)
        if self._kill_timer is None:
            delay = self.cfg.shutdown_grace + KILL_AFTER_GRACE
            self._kill_timer = asyncio.get_running_loop().call_later(delay, self._kill)

    def _forward(self, sig: signal.Signals) -> None:
        for worker in self.workers:
            _send(worker, sig)

    def _kill(self) -> None:
        for index, worker in enumerate(self.workers):
            if worker.returncode is None:
                log.warning("worker %d (pid %d) is still running: killing it", index, worker.pid)
                _send(worker, signal.SIGKILL)


def _send(worker: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    if worker.returncode is None:
        with contextlib.suppress(ProcessLookupError):  # exited; its wait() reports it
            worker.send_signal(sig)


def _status(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


# --- a worker -------------------------------------------------------------------------------


def serve_worker(cfg: ServeConfig, index: int) -> int:
    if not 0 <= index < cfg.workers:
        raise ConfigError(f"--worker-index {index}: expected 0 to {cfg.workers - 1}")
    formatter = logging.Formatter(
        f"%(asctime)s %(levelname)s %(name)s[worker {index}]: %(message)s"
    )
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)
    if cfg.admin:
        host, _, port = cfg.admin.rpartition(":")
        cfg = dataclasses.replace(cfg, admin=f"{host}:{int(port) + index}")
    asyncio.run(_serve_worker(cfg))
    return 0


async def _serve_worker(cfg: ServeConfig) -> None:
    stopping = asyncio.Event()
    orphaned = asyncio.create_task(_supervisor_gone(stopping))
    try:
        await run(cfg, stopping)
    finally:
        orphaned.cancel()


async def _supervisor_gone(stopping: asyncio.Event) -> None:
    """Set `stopping` when stdin, the supervisor's pipe, ends: the supervisor is gone
    (however it ended), and a worker must not serve on unsupervised."""
    try:
        if not stat.S_ISFIFO(os.fstat(0).st_mode):
            return  # not started by a supervisor
    except OSError:  # no stdin at all
        return
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
    )
    try:
        await reader.read()
    finally:
        transport.close()
    log.warning("the supervisor is gone; shutting down")
    stopping.set()
