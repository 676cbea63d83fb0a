"""Child process of an on-disk Annoy build.

Usage: ``python -m pipeline.annoy_child VECTORS OUT TREES SEED``.

Annoy's on-disk build writes through a memory-mapped file that it grows as it
goes; on a full disk the kernel kills the writer with SIGBUS, which no Python
code can catch. Run in its own process, that death is only this child's: the
parent (``similarity_search.build_annoy_index``) reports it as ENOSPC.
"""

from __future__ import annotations

import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int) -> None:
    """Ask Linux to kill this process when its parent ends (elsewhere: nothing).

    A run that stops (a failed stage, a signal) while the forest builds must not
    leave the build running on; the parent's pid is checked after the request, in
    case the parent ended before it.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux, or no prctl
        return
    if os.getppid() != parent_pid:
        os._exit(1)


def main(argv: list[str]) -> int:
    """Build the forest over the .npy matrix ``argv[0]`` into ``argv[1]``; 0 on success."""
    from pipeline import similarity_search

    vectors_path, out, n_trees, seed = argv
    vectors = similarity_search.load_vectors(vectors_path, mmap=True)
    similarity_search._build_here(vectors, out, int(n_trees), int(seed), on_disk=True)
    return 0


if __name__ == "__main__":
    if os.environ.get("SIMILARITY_ANNOY_PARENT"):
        die_with_parent(int(os.environ["SIMILARITY_ANNOY_PARENT"]))
    sys.exit(main(sys.argv[1:]))
