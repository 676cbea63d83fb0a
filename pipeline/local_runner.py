"""Which Beam runner object runs a job that asked for DirectRunner.

Beam's ``DirectRunner`` first tries the Prism runner, which downloads a Go
binary from GitHub on first use, and falls back to its Fn API runner when that
fails. A nightly job on a machine without internet then pays a network attempt
(or hangs on a firewall that drops packets) and converts the graph twice before
doing any work. This job is batch only — no streaming sources, no TestStream,
no real-time timers — which is exactly what the fallback, ``FnApiRunner``, runs;
so a DirectRunner job goes straight to it, with the pipeline options handed to
its workers the same way DirectRunner hands them. ``--runner=PrismRunner``
still picks Prism for anyone who wants it.
"""

from __future__ import annotations

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

DIRECT_NAMES = (None, "DirectRunner", "SwitchingDirectRunner")


def is_direct(options: PipelineOptions) -> bool:
    """Whether the job asked for Beam's DirectRunner (the default when no runner is named)."""
    return options.view_as(StandardOptions).runner in DIRECT_NAMES


def runner_for(options: PipelineOptions):
    """The runner object to pass to ``beam.Pipeline``, or None to let Beam pick by name."""
    if not is_direct(options):
        return None
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    provision = fn_runner.ExtendedProvisionInfo(
        beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
    return fn_runner.FnApiRunner(provision_info=provision)
