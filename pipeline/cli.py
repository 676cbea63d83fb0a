"""Command-line checks of ``pipeline.run``: unknown options are errors, ``--help`` is grouped.

Beam's own option parsing logs "Discarding unparseable args" and carries on,
so ``--top-k=10`` or a misspelt ``--quality`` would run to the end with the
defaults. :func:`unknown_option_error` checks the arguments against every
registered ``PipelineOptions`` class (ours and Beam's) before anything starts.
"""

from __future__ import annotations

import argparse
import difflib

from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.options import SimilarityOptions

# --help sections, in order. Every option of ours belongs to one (tests/test_run_experience.py
# fails on an option left out); help_text still lists a forgotten one under "other".
HELP_GROUPS = (
    ("input", ("input", "id_column", "image_column", "embedding_column", "embedding_dim",
               "model_id")),
    ("model", ("model", "engine", "model_cache_dir", "batch_size", "model_threads",
               "model_lanes", "max_image_pixels")),
    ("search", ("top_k", "search", "nlist", "nprobe", "recall_target", "n_trees", "search_k",
                "seed", "pca_dim", "partition_by", "exclude_same", "min_similarity",
                "duplicate_threshold")),
    ("quality", ("quality", "whiten_dim", "whiten_power", "whiten_shrinkage", "dba_k",
                 "dba_alpha")),
    ("output and nightly", ("output", "run_id", "full_rebuild", "keep_runs", "features_only",
                            "eval_label_column", "max_failed_share", "max_product_loss",
                            "force_publish")),
    ("fetching", ("fetch_concurrency", "fetch_timeout", "fetch_total_timeout",
                  "fetch_retries", "fetch_user_agent", "allow_private_hosts",
                  "max_image_bytes")),
    ("logging and progress", ("log_level", "verbose", "no_progress", "progress_interval")),
)
OTHER_GROUP = "other"

BEAM_HELP = """Beam:
  Every Apache Beam pipeline option is accepted, e.g.
  --runner=DirectRunner|PortableRunner|DataflowRunner   where the job runs (default DirectRunner)
  --direct_running_mode=in_memory|multi_processing --direct_num_workers=N   local workers
  --project, --region, --temp_location, --setup_file, --sdk_container_image   Dataflow
  python -m runners.direct and python -m runners.dataflow set these for you."""


def _all_options_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(allow_abbrev=False, add_help=False)
    seen = {}
    pending = list(PipelineOptions.__subclasses__())
    while pending:  # subclasses of subclasses register options too
        cls = pending.pop()
        if str(cls) in seen:
            continue
        seen[str(cls)] = cls
        pending.extend(cls.__subclasses__())
    for cls in seen.values():
        try:
            cls._add_argparse_args(parser)  # pylint: disable=protected-access
        except argparse.ArgumentError:
            continue  # the same flag registered twice by two classes: already known
    return parser


def unknown_option_error(argv: list[str]) -> str | None:
    """One sentence about the first argument no options class knows, or None."""
    parser = _all_options_parser()
    _, unknown = parser.parse_known_args(argv)
    known_flags = sorted({flag for action in parser._actions  # noqa: SLF001
                          for flag in action.option_strings})
    for arg in unknown:
        if not arg.startswith("-"):
            return (f"unexpected argument {arg!r} (options are written --name=value; "
                    f"see --help)")
        flag = arg.split("=", 1)[0]
        wanted = flag.replace("-", "_").lstrip("_")
        candidates = {f.replace("-", "_").lstrip("_"): f for f in known_flags}
        close = difflib.get_close_matches(wanted, list(candidates), n=1, cutoff=0.75)
        hint = f"; did you mean {candidates[close[0]]}?" if close else " (see --help)"
        return f"unknown option {flag}{hint}"
    return None


def _first_sentence(text: str | None) -> str:
    text = " ".join((text or "").split())
    end = text.find(". ")
    return text if end < 0 else text[: end + 1]


def ungrouped_options() -> tuple[str, ...]:
    """Our options that no ``HELP_GROUPS`` section names (``--help`` shows them under "other").

    Why: a new option must be placed in its concern group; the test suite asserts
    this is empty, so forgetting is caught when the option is added.
    """
    parser = argparse.ArgumentParser(allow_abbrev=False, add_help=False)
    SimilarityOptions._add_argparse_args(parser)  # pylint: disable=protected-access
    placed = {name for _, names in HELP_GROUPS for name in names}
    return tuple(a.dest for a in parser._actions if a.dest not in placed)  # noqa: SLF001


def help_text(prog: str = "python -m pipeline.run") -> str:
    """The options of the job grouped by concern, with defaults and one line each."""
    parser = argparse.ArgumentParser(allow_abbrev=False, add_help=False)
    SimilarityOptions._add_argparse_args(parser)  # pylint: disable=protected-access
    actions = {a.dest: a for a in parser._actions}  # noqa: SLF001
    lines = [f"usage: {prog} --input=CATALOG --output=ROOT [options] [Beam options]", ""]
    grouped = set()
    sections = list(HELP_GROUPS)
    rest = ungrouped_options()
    if rest:
        sections.append((OTHER_GROUP, rest))
    for title, names in sections:
        present = [actions[name] for name in names if name in actions]
        if not present:
            continue
        lines.append(f"{title}:")
        for action in present:
            grouped.add(action.dest)
            flags = ", ".join(action.option_strings)
            takes_value = action.nargs != 0
            left = f"  {flags}" + ("=VALUE" if takes_value else "")
            default = action.default
            shown = "" if default in (None, False, "") or not takes_value else \
                f" [default: {default}]"
            lines.append(f"{left}\n      {_first_sentence(action.help)}{shown}")
        lines.append("")
    lines.append(BEAM_HELP)
    return "\n".join(lines)
