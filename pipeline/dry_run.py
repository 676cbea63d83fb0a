"""``--dry_run=True``: build and translate the job, write and publish nothing.

Beam's DataflowRunner honours ``--dry_run`` by building the whole Dataflow job
(the portable pipeline proto, its environments and staged files) and returning
without submitting it. The entry point then must not publish: there is no run
directory, no INCOMPLETE marker and LATEST stays where it is. Other runners
ignore Beam's flag, so for them the graph is only translated to the portable
protos, never run. Either way the caller gets a short summary of the job.
"""

from __future__ import annotations

from apache_beam.options.pipeline_options import (
    GoogleCloudOptions,
    PipelineOptions,
    SetupOptions,
    StandardOptions,
    TestOptions,
    WorkerOptions,
)

from pipeline import logs

OPTIONS_THAT_MATTER = (
    (GoogleCloudOptions, ("project", "region", "temp_location", "staging_location",
                          "job_name", "service_account_email")),
    (WorkerOptions, ("machine_type", "num_workers", "max_num_workers", "sdk_container_image")),
    (SetupOptions, ("setup_file", "requirements_file", "save_main_session")),
)


def requested(options: PipelineOptions) -> bool:
    """Whether the user asked for a dry run (Beam's ``--dry_run=True``)."""
    return bool(options.view_as(TestOptions).dry_run)


def _environments(proto) -> list[dict]:
    from apache_beam.portability import common_urns
    from apache_beam.portability.api import beam_runner_api_pb2

    out = []
    for env_id, env in sorted(proto.components.environments.items()):
        image = None
        if env.urn == common_urns.environments.DOCKER.urn:
            image = beam_runner_api_pb2.DockerPayload.FromString(env.payload).container_image
        staged = []
        for dep in env.dependencies:
            if dep.role_urn == common_urns.artifact_roles.STAGING_TO.urn:
                staged.append(beam_runner_api_pb2.ArtifactStagingToRolePayload
                              .FromString(dep.role_payload).staged_name)
        out.append({"id": env_id, "urn": env.urn, "image": image, "staged": staged})
    return out


def summarize_job(pipeline, result, options: PipelineOptions, settings: dict) -> dict:
    """What the built job consists of: steps, environments, staged files, key options."""
    proto = getattr(pipeline.runner, "proto_pipeline", None) or pipeline.to_runner_api()
    transforms = proto.components.transforms
    leaves = [t for t in transforms.values() if not t.subtransforms]
    picked = {}
    for view, names in OPTIONS_THAT_MATTER:
        values = options.view_as(view)
        for name in names:
            value = getattr(values, name, None)
            if value not in (None, [], False):
                picked[name] = value
    job = getattr(result, "job", None)
    return {
        "dry_run": True,
        "runner": options.view_as(StandardOptions).runner or "DirectRunner",
        "transforms": len(transforms),
        "steps": len(leaves),
        "environments": _environments(proto),
        "dataflow_job_name": getattr(getattr(job, "proto", None), "name", None),
        "options": picked,
        "input": settings["input"],
        "output": settings["output"],
        "would_write": settings["run_dir"],
        "model": settings["model"],
        "previous_run": settings["previous_run"],
    }


def build_job(pipeline, options: PipelineOptions, settings: dict) -> dict:
    """Build (and on Dataflow, translate and stage locally) the job without running it."""
    runner = options.view_as(StandardOptions).runner or ""
    result = None
    if "Dataflow" in runner:
        with logs.native_noise_filtered():  # staging's subprocesses write to fd 2
            result = pipeline.run()
    return summarize_job(pipeline, result, options, settings)


def describe(summary: dict) -> str:
    """The dry run's summary as a few lines for a person."""
    lines = [f"Dry run on {summary['runner']}: the job was built and not submitted; nothing "
             f"was written or published.",
             f"  {summary['steps']} steps ({summary['transforms']} transforms with composites)",
             f"  input: {summary['input']}", f"  output root: {summary['output']} (a run would "
             f"write {summary['would_write']}; previous run: {summary['previous_run']})",
             f"  model: {summary['model']}"]
    for env in summary["environments"]:
        lines.append(f"  environment {env['id']}: {env['urn']}"
                     + (f", image {env['image']}" if env["image"] else ""))
        lines += [f"    staged: {name}" for name in env["staged"]]
    for name, value in summary["options"].items():
        lines.append(f"  --{name}={value}")
    return "\n".join(lines)
