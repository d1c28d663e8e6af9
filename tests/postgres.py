"""A real PostgreSQL server for the team tests: Debian's binaries (`apt-get install postgresql`, which
.ci/run does where they are missing), a throw-away cluster in a temporary folder, on 127.0.0.1 and a
free port, Unix sockets in that folder only, and one password-protected role that owns the databases
the tests create. `initdb` refuses to run as root: as root, the server runs as the `postgres` user.

Where no server can be started the tests that need one skip with the reason; in CI (`CI` set) they fail
instead, so a CI run never passes by skipping them.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from workspace import free_port

ROLE = "tests"  # the tests' own role; tests/test_team.py creates docs/team.md's `team` with its SQL
# a password with characters that must be quoted in a URL, to prove it is handled and never shown
PASSWORD = "s3cret-Pg/pass:word"
SUPERUSER = "postgres"


def binaries() -> Path | None:
    """The folder of `initdb` and `pg_ctl`: the newest of Debian's /usr/lib/postgresql/N/bin, else PATH's."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda path: int(path.parts[-3]))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def unavailable(reason: str) -> None:
    """Skip (or, in CI, fail) the test that needs PostgreSQL, with the reason."""
    message = f"no PostgreSQL server for the team tests: {reason}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI must run them: .ci/run installs the postgresql package)")
    pytest.skip(message)


class PostgresServer:
    """One cluster: `start`, `stop`, `restart` on the same port and data, `create_database`, `url`."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="pg-"))  # under /tmp: pytest's own tmp is root-only
        self.data = self.root / "data"
        self.sockets = self.root / "sockets"
        self.log = self.root / "server.log"
        self.port = 0
        self.user = SUPERUSER if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        if os.geteuid() == 0:
            entry = pwd.getpwnam(SUPERUSER)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self.root.chmod(0o700)

    def _command(self, program: str, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A PostgreSQL program run as the cluster's owner."""
        command = [str(self.bindir / program), *map(str, args)]
        if os.geteuid() == 0:
            command = ["runuser", "-u", SUPERUSER, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=self.root)
        if check and done.returncode:
            raise RuntimeError(f"{program} exited {done.returncode}: {(done.stderr or done.stdout).strip()[-2000:]}")
        return done

    def init(self) -> None:
        """A new cluster: TCP connections need a password (SCRAM), the Unix socket only the OS user."""
        self._command(
            "initdb",
            "-D",
            self.data,
            "-U",
            self.user,
            "--auth-host=scram-sha-256",
            "--auth-local=peer",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",  # a throw-away cluster; the server itself still syncs every commit
        )
        self.sockets.mkdir()
        if os.geteuid() == 0:
            entry = pwd.getpwnam(SUPERUSER)
            os.chown(self.sockets, entry.pw_uid, entry.pw_gid)

    def start(self) -> None:
        """Start the server (on `self.port`, or a free port the first time) and wait until it accepts."""
        for _ in range(5):
            port = self.port or free_port()
            options = f"-c listen_addresses=127.0.0.1 -p {port} -k {self.sockets} -c max_connections=200"
            done = self._command(
                "pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "60", "-o", options, "start", check=False
            )
            if done.returncode == 0:
                self.port = port
                return
            if self.port:  # a restart must keep its port
                break
        raise RuntimeError(f"PostgreSQL did not start: {done.stdout.strip()} {self.log_tail()}")

    def stop(self) -> None:
        """A fast shutdown: open transactions are rolled back, connections closed, committed data kept."""
        self._command("pg_ctl", "-D", self.data, "-m", "fast", "-w", "-t", "60", "stop", check=False)

    def running(self) -> bool:
        return self._command("pg_ctl", "-D", self.data, "status", check=False).returncode == 0

    def restart(self) -> None:
        self.stop()
        self.start()

    def sql(self, statement: str, database: str = "postgres") -> str:
        """Run one statement as the superuser, over the Unix socket; what it prints."""
        done = self._command(
            "psql",
            "-h",
            self.sockets,
            "-p",
            str(self.port),
            "-d",
            database,
            "-U",
            self.user,
            "-v",
            "ON_ERROR_STOP=1",
            "-tA",
            "-c",
            statement,
        )
        return done.stdout.strip()

    def create_role(self) -> None:
        self.sql(f"CREATE ROLE {ROLE} LOGIN PASSWORD {literal(PASSWORD)}")

    def create_database(self, name: str) -> str:
        """A new database owned by the team's role; its URL."""
        self.sql(f"CREATE DATABASE {name} OWNER {ROLE}")
        return self.url(name)

    def url(self, database: str, role: str = ROLE) -> str:
        """`postgresql://<role>:<password>@127.0.0.1:<port>/<database>`, the password percent-encoded."""
        from urllib.parse import quote

        return f"postgresql://{role}:{quote(PASSWORD, safe='')}@127.0.0.1:{self.port}/{database}"

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text()[-2000:]
        return ""

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def literal(text: str) -> str:
    """`text` as an SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def start_server() -> PostgresServer:
    """A running server with the team's role, or skip/fail saying why there is none."""
    bindir = binaries()
    if bindir is None:
        unavailable("initdb not found (apt-get install postgresql)")
    assert bindir is not None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SUPERUSER)
        except KeyError:
            unavailable(f"running as root and there is no '{SUPERUSER}' user to run the server as")
    server = PostgresServer(bindir)
    try:
        server.init()
        server.start()
        server.create_role()
    except (RuntimeError, OSError, subprocess.SubprocessError) as error:
        server.remove()
        unavailable(str(error))
    return server
