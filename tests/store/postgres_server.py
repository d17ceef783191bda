"""A throwaway PostgreSQL server for the tests: a real `postgres` process on loopback.

`PostgresServer.start()` runs `initdb` into a temporary directory and `pg_ctl start` on 127.0.0.1 at
a free port (its Unix socket inside that directory too), trust authentication for local loopback
only; `stop()` stops it (immediate mode) and deletes the directory. Each test takes a database of
its own (`create_database`), so tests never see each other's rows.

The binaries come from Debian's `postgresql` package (/usr/lib/postgresql/<major>/bin, not on PATH),
from PATH, or from A2V_PG_BIN. PostgreSQL refuses to run as root, so as root (CI) the server runs as
the package's `postgres` user (`setpriv`), in a directory handed to that user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from anime2vec.runlocal import free_ports

INSTALL_HINT = (
    "PostgreSQL is not installed: `make postgres` installs Debian's package (apt, as root); without "
    "root, install it with your package manager (e.g. `sudo apt-get install postgresql`) or point "
    "A2V_PG_BIN at a directory holding initdb and pg_ctl"
)


def find_bin_dir() -> Path | None:
    """Where initdb and pg_ctl are: A2V_PG_BIN, Debian's newest /usr/lib/postgresql/*/bin, or PATH."""
    candidates = []
    if os.environ.get("A2V_PG_BIN"):
        candidates.append(Path(os.environ["A2V_PG_BIN"]))
    candidates += [
        Path(p)
        for p in sorted(
            glob.glob("/usr/lib/postgresql/*/bin"),
            key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
            reverse=True,
        )
    ]
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(os.path.realpath(on_path)).parent)
    for c in candidates:
        if (c / "initdb").is_file() and (c / "pg_ctl").is_file():
            return c
    return None


@dataclass
class PostgresServer:
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="a2v-pg-")))
    port: int = 0
    bin_dir: Path | None = None
    user: str = "a2v"  # the database superuser the tests connect as

    def __post_init__(self) -> None:
        self.bin_dir = self.bin_dir or find_bin_dir()
        if self.bin_dir is None:
            raise RuntimeError(INSTALL_HINT)
        self.port = self.port or free_ports(1)[0]
        self._run_as: list[str] = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")  # created by Debian's package
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self._run_as = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups"]

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [*self._run_as, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "LC_ALL": "C.UTF-8", "TZ": "UTC"},
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"{Path(args[0]).name} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
            )
        return proc

    def start(self) -> "PostgresServer":
        self._run(
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.data_dir),
            "-U",
            self.user,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-instructions",
        )
        # loopback only; fsync stays on (the default): kill -9 tests rely on what was committed
        opts = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root} "
            f"-c max_connections=200 -c shared_buffers=32MB -c log_min_messages=warning"
        )
        self._run(
            str(self.bin_dir / "pg_ctl"),
            "-D",
            str(self.data_dir),
            "-l",
            str(self.root / "server.log"),
            "-o",
            opts,
            "-w",
            "-t",
            "60",
            "start",
        )
        return self

    def stop(self) -> None:
        if self.data_dir.exists():
            try:
                self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate", "-w", "stop")
            except RuntimeError:
                pass  # not running
        shutil.rmtree(self.root, ignore_errors=True)

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user={self.user} dbname={dbname}"

    def create_database(self, prefix: str = "t") -> str:
        """A new empty database; its DSN."""
        import psycopg

        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def log_tail(self) -> str:
        try:
            return (self.root / "server.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""
