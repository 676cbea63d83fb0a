"""Local servers the runner tests start on 127.0.0.1 and stop afterwards.

- :class:`BeamPortableServices`: Beam's local job service and an EXTERNAL
  worker pool, each in its own process (the pool starts one more process per
  worker), so a job submitted with ``--runner=PortableRunner`` runs the way a
  distributed runner runs it: translated to the portable protos, shipped over
  gRPC, executed by workers that unpickle every DoFn themselves.
- :class:`GcsEmulator`: the ``gcp-storage-emulator`` package's GCS JSON API
  server, reached through ``STORAGE_EMULATOR_HOST`` by google-cloud-storage
  (and so by Beam's ``gs://`` filesystem).
- :class:`TokenServer`: an OAuth token endpoint for a test credential, so
  ``google.auth.default()`` finds credentials at once instead of Beam retrying
  the lookup for ~30 s in every process, and so a refused credential can be
  tested offline.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 60.0,
                  log: Path | None = None) -> None:
    """Wait until ``process`` accepts connections on ``port`` (or fail with its log)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}: "
                               f"{log.read_text()[-2000:] if log else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server did not listen on {port} within {timeout:.0f} s: "
                       f"{log.read_text()[-2000:] if log else ''}")


def stop(process: subprocess.Popen) -> None:
    """Stop a server process this module started, and its worker children.

    Each server is started in its own process group, so the group id is the
    server's own pid: only the processes started for the test are signalled.
    """
    if process.poll() is None:
        try:
            os.killpg(process.pid, 15)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait(timeout=10)


def start_server(args: list[str], port: int, log: Path, cwd: Path, env: dict) -> subprocess.Popen:
    """Start one server process (own process group) and wait until it listens."""
    handle = open(log, "wb")
    process = subprocess.Popen(args, cwd=cwd, env=env, stdout=handle,
                               stderr=subprocess.STDOUT, start_new_session=True)
    handle.close()
    try:
        wait_for_port(port, process, log=log)
    except BaseException:
        stop(process)
        raise
    return process


def repo_env(extra: dict | None = None) -> dict:
    """The environment for processes that must import this checkout's code."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]]
                                                       if env.get("PYTHONPATH") else []))
    env.update(extra or {})
    return env


class BeamPortableServices:
    """A local job service plus an EXTERNAL worker pool, as context manager.

    ``python`` is the interpreter of the worker pool (and so of every worker);
    ``worker_cwd`` and ``worker_env`` its working directory and environment.
    """

    def __init__(self, log_dir: Path, python: str = sys.executable,
                 worker_cwd: Path = REPO, worker_env: dict | None = None,
                 job_env: dict | None = None):
        self.log_dir = Path(log_dir)
        self.python = python
        self.worker_cwd = worker_cwd
        self.worker_env = dict(worker_env if worker_env is not None else repo_env())
        # The pool starts each worker as a bare ``python`` found on PATH, not as its own
        # interpreter: put that interpreter's directory first, so workers run it too.
        bin_dir = os.path.dirname(python)
        self.worker_env["PATH"] = os.pathsep.join(
            [bin_dir] + [d for d in self.worker_env.get("PATH", "").split(os.pathsep) if d])
        self.job_env = job_env if job_env is not None else repo_env()
        self.processes: list[subprocess.Popen] = []
        self.job_port = self.worker_port = None

    def __enter__(self) -> "BeamPortableServices":
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.worker_port = free_port()
            self.processes.append(start_server(
                [self.python, "-m", "apache_beam.runners.worker.worker_pool_main",
                 f"--service_port={self.worker_port}"],
                self.worker_port, self.log_dir / "worker_pool.log", self.worker_cwd,
                self.worker_env))
            self.job_port = free_port()
            self.processes.append(start_server(
                [sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main",
                 f"--port={self.job_port}", f"--staging_dir={self.log_dir / 'staging'}"],
                self.job_port, self.log_dir / "job_service.log", REPO, self.job_env))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for process in reversed(self.processes):
            stop(process)
        self.processes.clear()

    def pipeline_args(self) -> list[str]:
        """The Beam options that send a job to these services."""
        return ["--runner=PortableRunner", f"--job_endpoint=localhost:{self.job_port}",
                "--environment_type=EXTERNAL",
                f"--environment_config=localhost:{self.worker_port}"]

    def worker_log(self) -> str:
        """What the worker pool and its workers printed (for assertion messages)."""
        path = self.log_dir / "worker_pool.log"
        return path.read_text(errors="replace") if path.exists() else ""


class GcsEmulator:
    """``gcp-storage-emulator`` on 127.0.0.1 (in memory), as context manager."""

    def __init__(self, log_dir: Path, buckets: tuple[str, ...] = ("vs-test",)):
        self.log_dir = Path(log_dir)
        self.buckets = buckets
        self.process = None
        self.port = None

    @property
    def host(self) -> str:
        """The value for ``STORAGE_EMULATOR_HOST``."""
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "GcsEmulator":
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process = start_server(
            [sys.executable, "-m", "gcp_storage_emulator", "start", "--host=127.0.0.1",
             f"--port={self.port}", "--in-memory", f"--default-bucket={self.buckets[0]}"],
            self.port, self.log_dir / "gcs_emulator.log", self.log_dir, dict(os.environ))
        for name in self.buckets[1:]:
            self.client().create_bucket(name)
        return self

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            stop(self.process)
            self.process = None

    def client(self):
        """An anonymous google-cloud-storage client talking to the emulator."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(project="test", credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": self.host})

    def upload_tree(self, local: Path, bucket: str, prefix: str) -> None:
        """Copy every file under ``local`` to ``gs://bucket/prefix/…``."""
        target = self.client().bucket(bucket)
        for path in sorted(Path(local).rglob("*")):
            if path.is_file():
                name = f"{prefix}/{path.relative_to(local).as_posix()}"
                target.blob(name).upload_from_filename(str(path))

    def read(self, url: str) -> bytes:
        """The bytes of object ``gs://bucket/name``."""
        bucket, name = url[len("gs://"):].split("/", 1)
        return self.client().bucket(bucket).blob(name).download_as_bytes()

    def names(self, bucket: str, prefix: str = "") -> list[str]:
        """Object names in ``bucket`` under ``prefix``."""
        return sorted(b.name for b in self.client().list_blobs(bucket, prefix=prefix))


class _TokenHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's naming)
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.requests += 1
        if self.server.refuse:
            body, status = {"error": "invalid_grant",
                            "error_description": "Token has been expired or revoked."}, 400
        else:
            body, status = {"access_token": "test-token", "expires_in": 3600,
                            "token_type": "Bearer"}, 200
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class TokenServer:
    """An OAuth2 token endpoint on 127.0.0.1 for a test service-account key file.

    ``refuse=True`` answers every refresh with ``invalid_grant`` (a revoked
    credential). :meth:`write_credentials` writes the file to point
    ``GOOGLE_APPLICATION_CREDENTIALS`` at.
    """

    def __init__(self, refuse: bool = False):
        self.refuse = refuse
        self.server = None

    def __enter__(self) -> "TokenServer":
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TokenHandler)
        self.server.refuse = self.refuse
        self.server.requests = 0
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def requests(self) -> int:
        """How many token requests were answered."""
        return self.server.requests

    def write_credentials(self, path: Path) -> Path:
        """A ``service_account`` key file (fresh RSA key) whose token endpoint is this server.

        google-auth always sends ``authorized_user`` refreshes to Google, but
        honours a service account key's ``token_uri``.
        """
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
        path.write_text(json.dumps({
            "type": "service_account", "project_id": "test-project",
            "private_key_id": "test", "private_key": pem,
            "client_email": "runner@test-project.iam.gserviceaccount.com",
            "client_id": "1", "token_uri":
                f"http://127.0.0.1:{self.server.server_address[1]}/token"}))
        return path
