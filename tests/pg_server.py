"""A real, throw-away PostgreSQL server for tests: the ``postgres_dsn`` session fixture.

Uses the server binaries of Debian's ``postgresql`` package
(``/usr/lib/postgresql/<version>/bin``; override with ``PG_BINDIR``): ``initdb``
a cluster in a fresh temporary directory, start it with ``pg_ctl`` on a free
127.0.0.1 port (its unix socket in the same directory, so nothing outside is
touched), wait until it accepts connections, and stop it and delete the
directory at the end of the session. PostgreSQL refuses to run as root, so as
root the commands run as the ``postgres`` user via ``runuser``. Tests using it
are skipped, with the reason, only when no server binaries are installed.

Import the fixtures into a test module: ``from tests.pg_server import postgres_dsn``.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from typing import Iterator

import pytest

SUPERUSER = "postgres"
START_TIMEOUT_S = 60


def find_bindir() -> str | None:
    """The newest directory holding ``initdb``, ``pg_ctl`` and ``postgres``, or None."""
    candidates = [os.environ["PG_BINDIR"]] if os.environ.get("PG_BINDIR") else []

    def version(path: str) -> tuple:
        name = os.path.basename(os.path.dirname(path))
        return tuple(int(p) for p in name.split(".") if p.isdigit())

    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    for bindir in candidates:
        if all(os.access(os.path.join(bindir, tool), os.X_OK)
               for tool in ("initdb", "pg_ctl", "postgres")):
            return bindir
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_server_user() -> tuple[list[str], int | None, int | None]:
    """Command prefix and uid/gid for running the server (``postgres`` when we are root)."""
    if os.geteuid() != 0:
        return [], None, None
    try:
        user = pwd.getpwnam(SUPERUSER)
    except KeyError:
        pytest.skip("running as root, and there is no 'postgres' user to run the test server as")
    return ["runuser", "-u", SUPERUSER, "--"], user.pw_uid, user.pw_gid


def _run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=START_TIMEOUT_S)
    if result.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}):\n"
                           f"{result.stdout}\n{result.stderr}")


def _wait_until_ready(dsn: str) -> None:
    import psycopg

    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            with psycopg.connect(dsn, connect_timeout=2):
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """DSN of a superuser connection to a PostgreSQL server that lives for the test session."""
    bindir = find_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries in /usr/lib/postgresql/*/bin (install the "
                    "Debian 'postgresql' package, or set PG_BINDIR) — PostgreSQL tests skipped")
    prefix, uid, gid = _as_server_user()
    root = tempfile.mkdtemp(prefix="pgtest-")
    data, log = os.path.join(root, "data"), os.path.join(root, "server.log")
    if uid is not None:
        os.chown(root, uid, gid)
    _run(prefix + [os.path.join(bindir, "initdb"), "-D", data, "-U", SUPERUSER,
                   "--auth=trust", "--encoding=UTF8", "--no-locale", "--no-sync"])
    port = _free_port()
    options = (f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off "
               f"-c synchronous_commit=off -c full_page_writes=off")
    pg_ctl = os.path.join(bindir, "pg_ctl")
    dsn = f"host=127.0.0.1 port={port} user={SUPERUSER} dbname=postgres"
    try:
        try:
            _run(prefix + [pg_ctl, "-D", data, "-l", log, "-o", options, "-w",
                           "-t", str(START_TIMEOUT_S), "start"])
            _wait_until_ready(dsn)
        except Exception as exc:
            server_log = open(log).read() if os.path.exists(log) else ""
            raise RuntimeError(f"the test PostgreSQL did not start: {exc}\n"
                               f"server log:\n{server_log}") from exc
        yield dsn
    finally:
        subprocess.run(prefix + [pg_ctl, "-D", data, "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=START_TIMEOUT_S)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_db(postgres_dsn: str) -> Iterator[str]:
    """DSN of a new, empty database on the test server, dropped after the test."""
    import psycopg

    name = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield postgres_dsn.replace("dbname=postgres", f"dbname={name}")
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
