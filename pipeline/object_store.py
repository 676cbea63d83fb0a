"""A quick pre-flight check of the gs:// paths a run uses, before Beam touches them.

Beam's own GCS client retries a credential lookup for ~30 s and each request
for minutes, then fails with a traceback from wherever it first read a path.
Here one attempt with a short timeout and no retries checks that the ``[gcp]``
extra is installed, that a credential is found and yields a token, and that
each bucket answers; any failure is one sentence naming the path and the
cause. With ``STORAGE_EMULATOR_HOST`` set (a local GCS emulator) no
credential is required, as google-cloud-storage itself does.
"""

from __future__ import annotations

import os

from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions, TestOptions

TIMEOUT_S = 5.0
SCOPES = ("https://www.googleapis.com/auth/devstorage.read_write",)


class ObjectStoreError(ValueError):
    """A gs:// path the run needs cannot be used; reported as one sentence."""


def _cause(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


def gcs_paths(options: PipelineOptions) -> list[str]:
    """The gs:// paths among --input, --output and --temp_location."""
    values = options.get_all_options()
    paths = [values.get(name) for name in ("input", "output")]
    if not options.view_as(TestOptions).dry_run:  # Beam's dry run never reads temp_location
        paths.append(options.view_as(GoogleCloudOptions).temp_location)
    return [p for p in paths if isinstance(p, str) and p.startswith("gs://")]


def _credentials(path: str, emulator: str | None):
    import google.auth
    from google.auth import exceptions as auth_exceptions
    from google.auth.credentials import AnonymousCredentials
    from google.auth.transport.requests import Request

    try:
        credentials, _ = google.auth.default(scopes=list(SCOPES))
    except auth_exceptions.DefaultCredentialsError as exc:
        if emulator:
            return AnonymousCredentials()
        raise ObjectStoreError(f"{path}: no usable Google credentials ({_cause(exc)})") from None
    base = Request()

    def request(url, method="GET", body=None, headers=None, timeout=None, **kwargs):
        return base(url, method=method, body=body, headers=headers, timeout=TIMEOUT_S, **kwargs)

    try:
        credentials.refresh(request)
    except (auth_exceptions.RefreshError, auth_exceptions.TransportError) as exc:
        raise ObjectStoreError(f"{path}: the Google credential cannot get an access token "
                               f"({_cause(exc)})") from None
    return credentials


def check_gcs(paths: list[str], project: str | None = None) -> None:
    """Fail fast, in one sentence, if any gs:// path in ``paths`` cannot be reached."""
    if not paths:
        return
    try:
        import apache_beam.io.gcp.gcsfilesystem  # noqa: F401  (registers gs://)
        from google.api_core import exceptions as api_exceptions
        from google.cloud import storage
    except ImportError as exc:
        raise ObjectStoreError(
            f"{paths[0]}: gs:// paths need the [gcp] extra, which is not installed "
            f"({exc.name or exc} is missing): pip install -e '.[gcp]' "
            f"(apache-beam[gcp]==2.77.0)") from None
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    credentials = _credentials(paths[0], emulator)
    client = storage.Client(project=project or "<none>", credentials=credentials)
    for path in paths:
        bucket, _, prefix = path[len("gs://"):].partition("/")
        try:
            list(client.list_blobs(bucket, prefix=prefix, max_results=1,
                                   timeout=TIMEOUT_S, retry=None))
        except api_exceptions.NotFound:
            raise ObjectStoreError(f"{path}: bucket {bucket} does not exist") from None
        except api_exceptions.Forbidden as exc:
            raise ObjectStoreError(f"{path}: the credential may not list bucket {bucket} "
                                   f"({_cause(exc)})") from None
        except Exception as exc:  # connection refused, DNS, timeout, 5xx: one attempt only
            where = emulator or "storage.googleapis.com"
            raise ObjectStoreError(f"{path}: cannot reach {where} ({_cause(exc)})") from None


def preflight(options: PipelineOptions) -> None:
    """Check every gs:// path of the run (no-op when there is none)."""
    check_gcs(gcs_paths(options), options.view_as(GoogleCloudOptions).project)
