"""Child processes that die with their parent and keep their output in a log file."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from paystream.config import Settings
from paystream.errors import DevenvError
from paystream_tooling import polling

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: the kernel kills it when its parent exits."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def answers_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    """Whether `url` answers 200 within a second (a server started and ready)."""
    try:
        with urllib.request.urlopen(url, timeout=1, context=context) as response:
            return bool(response.status == 200)
    except OSError:  # refused, reset, timed out, or an HTTP error status
        return False


def ensure_port_free(host: str, port: int, what: str, hint: str) -> None:
    """Fail fast, in one sentence, when something already listens where we want to."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise DevenvError(
                f"Port {port} on {host} is taken, so {what} cannot start there; {hint}."
            ) from exc


class ChildProcess:
    """A long-running child: started with its output in `log_path`, stopped by `stop()`."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: dict[str, str] | None = None,
        user: int | None = None,
        group: int | None = None,
        stop_signal: int = signal.SIGTERM,
    ) -> None:
        self.name = name
        self.log_path = log_path
        self._stop_signal = stop_signal
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            list(argv),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            user=user,
            group=group,
            preexec_fn=_die_with_parent,  # the only way to set PDEATHSIG before exec
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def wait_until(self, ready: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Poll `ready` until it holds; fail with the log's tail if the child dies or times out."""

        def died() -> str | None:
            if self.running():
                return None
            return f"{self.name} exited with status {self.process.returncode}"

        try:
            polling.until(ready, timeout_s, what, every_s=0.1, failed=died)
        except polling.TimedOut as exc:
            raise DevenvError(f"{exc}; see {self.log_path}:\n{self.log_tail()}") from None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL, for crash tests."""
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        self.process.wait()
        self._log.close()

    def stop(self, timeout_s: float = 20.0) -> int:
        """Ask it to stop (its stop signal), wait, kill if it will not; returns its exit status."""
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, self._stop_signal)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


def spawn_processor(
    settings: Settings,
    log_path: Path,
    wrap: Callable[[list[str]], list[str]] = lambda argv: argv,
) -> ChildProcess:
    """`paystream run` with these settings as a child process (crash tests, scale-out, bench);
    `wrap` changes its command line (to run it in a network namespace, say)."""
    argv = wrap([sys.executable, "-m", "paystream", "run"])
    return ChildProcess("processor", argv, log_path, env={**os.environ, **settings.as_env()})
