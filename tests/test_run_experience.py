"""What a person sees: quiet stderr, live progress consistent with the counts, strict options."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys

import pytest

from pipeline import logs, progress
from pipeline.run import main
from pipeline.run_progress import ProgressReporter, expected_rows
from tests.conftest import REPO

PROGRESS = re.compile(r"^progress: \[(?P<phase>[a-z]+)\]\s+read (?P<read>\d+)(?:/~?\d+)?\s+"
                      r"fetched (?P<fetched>\d+)\s+decoded (?P<decoded>\d+)\s+"
                      r"embedded (?P<embedded>\d+)\s+reused (?P<reused>\d+)\s+"
                      r"failed (?P<failed>\d+)(?: \((?P<by_stage>[^)]*)\))?")


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sample")
    subprocess.run([sys.executable, "-m", "pipeline.sample", str(directory)], cwd=REPO,
                   check=True, capture_output=True, timeout=300)
    return directory / "catalog.csv"


def _cli(module, *args, env=None):
    env = dict(os.environ, **(env or {}))
    for name in ("TF_CPP_MIN_LOG_LEVEL", "GRPC_VERBOSITY", logs.ENV_LEVEL,
                 progress.ENV_DIR):
        env.pop(name, None)  # the run must quiet itself, not rely on the caller
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def last_progress(stderr: str) -> dict:
    """The fields of the last ``progress:`` line (fails when there is none)."""
    lines = [PROGRESS.match(line) for line in stderr.splitlines()]
    lines = [m for m in lines if m]
    assert lines, f"no progress line in {stderr!r}"
    return lines[-1].groupdict()


def _manifest(root):
    return json.load(open(os.path.join(root, "LATEST", "manifest.json")))


@pytest.mark.parametrize("module,extra", [
    ("pipeline.run", []),
    ("runners.direct", ["--workers=2"]),
    ("pipeline.run", ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]),
])
def test_default_stderr_holds_only_progress_and_it_ends_on_the_final_counts(
        sample, tmp_path, module, extra):
    root = tmp_path / "out"
    proc = _cli(module, f"--input={sample}", f"--output={root}", "--progress_interval=0.2",
                *extra)
    assert proc.returncode == 0, proc.stderr
    noise = [line for line in proc.stderr.splitlines() if not line.startswith("progress: ")]
    assert noise == []
    last = last_progress(proc.stderr)
    counts = _manifest(root)["counts"]
    assert int(last["read"]) == counts["input"]
    assert int(last["embedded"]) == counts["newly_embedded"]
    assert int(last["reused"]) == counts["reused"]
    assert int(last["failed"]) == counts["failed"]
    by_stage = dict(part.split() for part in (last["by_stage"] or "").split(", ") if part)
    assert {k: int(v) for k, v in by_stage.items()} == counts["failed_by_stage"]
    assert last["phase"] == "publishing"
    assert "rows" in proc.stdout and "LATEST" in proc.stdout

    again = _cli(module, f"--input={sample}", f"--output={root}", "--no_progress", *extra)
    assert again.returncode == 0 and again.stderr == ""
    assert _manifest(root)["counts"]["reused"] == counts["embedded"]


def test_first_model_conversion_is_quiet_and_verbose_brings_the_logs_back(sample, tmp_path):
    cache = tmp_path / "cache"
    proc = _cli("pipeline.run", f"--input={sample}", f"--output={tmp_path / 'a'}",
                f"--model_cache_dir={cache}", "--no_progress")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    loud = _cli("pipeline.run", f"--input={sample}", f"--output={tmp_path / 'b'}",
                f"--model_cache_dir={cache}", "--no_progress", "-v")
    assert loud.returncode == 0
    assert "INFO" in loud.stderr  # Beam's and TFLite's own records are shown again


def test_unknown_options_exit_two_with_a_suggestion(capsys):
    assert main(["--input=x.csv", "--output=/tmp/o", "--top-k=10"]) == 2
    assert capsys.readouterr().err == "error: unknown option --top-k; did you mean --top_k?\n"
    assert main(["--input=x.csv", "--output=/tmp/o", "--colour_space=lab"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown option --colour_space")
    assert main(["--input=x.csv", "--output=/tmp/o", "--fetch_timout=3"]) == 2
    assert "did you mean --fetch_timeout?" in capsys.readouterr().err
    assert main(["--input=x.csv", "--output=/tmp/o", "stray"]) == 2
    assert "unexpected argument 'stray'" in capsys.readouterr().err


def test_beam_options_are_not_unknown():
    from pipeline.cli import unknown_option_error

    assert unknown_option_error(["--runner=DirectRunner", "--direct_num_workers=2",
                                 "--project=p", "--temp_location=gs://b/t", "--top_k=3",
                                 "-v", "--log_level=info", "--no_progress"]) is None


def test_help_is_grouped_by_concern(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    titles = [line[:-1] for line in text.splitlines() if line.endswith(":")
              and not line.startswith(" ")]
    assert titles == ["input", "model", "search", "quality", "output and nightly", "fetching",
                      "logging and progress", "Beam"]
    assert "--top_k=VALUE" in text and "[default: 20]" in text and "Beam:" in text
    search = text.split("\nsearch:\n")[1].split("\noutput and nightly:\n")[0]
    assert "--nprobe=VALUE" in search and "--recall_target=VALUE" in search


def test_every_option_is_in_its_concern_group():
    from pipeline.cli import HELP_GROUPS, ungrouped_options

    # A new option must be added to its --help section in pipeline/cli.py HELP_GROUPS.
    assert ungrouped_options() == ()
    placed = [name for _, names in HELP_GROUPS for name in names]
    assert len(placed) == len(set(placed))  # each in exactly one group


def test_quiet_filter_keeps_ours_and_third_party_errors():
    quiet = logs.QuietFilter(logging.WARNING, logging.ERROR)

    def record(name, level, *args, msg="%s"):
        return logging.LogRecord(name, level, "x.py", 1, msg, args or None, None)

    assert quiet.filter(record("pipeline.models.registry", logging.WARNING, "fell back"))
    assert not quiet.filter(record("pipeline.run", logging.INFO, "info"))
    assert not quiet.filter(record("apache_beam.transforms.util", logging.WARNING, "w"))
    assert quiet.filter(record("apache_beam.runners.worker", logging.ERROR, "e"))
    relay = "apache_beam.runners.portability.local_job_service"
    ours = ('severity: WARN message: "TFLite did not match: using the SavedModel" '
            'log_location: "/repo/pipeline/models/registry.py:193" thread: "1"')
    beams = ('severity: WARN message: "Discarding unparseable args: [\\\'--x\\\']" '
             'log_location: "/site/apache_beam/options/pipeline_options.py:570"')
    kept = record(relay, logging.WARNING, ours, msg="Worker: %s")
    assert quiet.filter(kept) and kept.getMessage() == "TFLite did not match: using the SavedModel"
    assert not quiet.filter(record(relay, logging.WARNING, beams, msg="Worker: %s"))


def test_native_noise_is_dropped_and_everything_else_replayed(capfd):
    with logs.native_noise_filtered(enabled=True):
        os.write(2, b"I0000 00:00:1796188845.569596   18379 port.cc:153] oneDNN on\n")
        os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n")
        os.write(2, b"E0000 00:00:1796188845.5 18379 cuda.cc:52] a real native error\n")
        print("our own line", file=sys.stderr)
    err = capfd.readouterr().err
    assert sorted(err.splitlines()) == [
        "E0000 00:00:1796188845.5 18379 cuda.cc:52] a real native error", "our own line"]


def test_progress_on_a_terminal_is_one_updating_line(tmp_path, monkeypatch):
    monkeypatch.setenv(progress.ENV_DIR, str(tmp_path))
    for _ in range(7):
        progress.count(progress.READ)
    progress.count(progress.EMBEDDED, 5)
    progress.count(progress.FAILED_PREFIX + "decode", 2)
    progress.flush()
    out = io.StringIO()
    reporter = ProgressReporter(str(tmp_path), total=7, stream=out, tty=True).start()
    snap = reporter.stop()
    assert snap.done == 7 and snap.failed_by_stage == {"decode": 2}
    text = out.getvalue()
    assert "\r" in text and "\n" not in text.rstrip("\n")  # redrawn in place
    assert "7/7" in text and "[embedding]" in text


def test_catalogue_size_known_at_start(tmp_path):
    rows = "".join(f'p{i},img{i}.jpg,"line one\nline two"\n' for i in range(50))
    path = tmp_path / "c.csv"
    path.write_text("product_id,image,description\n" + rows)
    assert expected_rows("csv", str(path)) == (50, True)


def test_live_progress_only_where_the_workers_share_this_machine():
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline.run_progress import workers_share_this_machine

    def shares(*args):
        return workers_share_this_machine(PipelineOptions(list(args)))

    portable = ("--runner=PortableRunner", "--job_endpoint=localhost:8099")
    assert shares() and shares("--direct_running_mode=multi_processing")
    assert shares(*portable, "--environment_type=EXTERNAL", "--environment_config=127.0.0.1:5")
    assert shares(*portable, "--environment_type=LOOPBACK")
    assert shares(*portable, "--environment_type=PROCESS", "--environment_config={}")
    assert not shares(*portable)  # DOCKER: containers do not see this disk
    assert not shares(*portable, "--environment_type=EXTERNAL",
                      "--environment_config=203.0.113.7:5")  # TEST-NET-3: another host
    assert not shares("--runner=DataflowRunner")
