"""Child process of an on-disk Annoy build.

Usage: ``python -m pipeline.annoy_child VECTORS OUT TREES SEED``.

Annoy's on-disk build writes through a memory-mapped file that it grows as it
goes; on a full disk the kernel kills the writer with SIGBUS, which no Python
code can catch. Run in its own process, that death is only this child's: the
parent (``similarity_search.build_annoy_index``) reports it as ENOSPC.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    """Build the forest over the .npy matrix ``argv[0]`` into ``argv[1]``; 0 on success."""
    from pipeline import similarity_search

    vectors_path, out, n_trees, seed = argv
    vectors = similarity_search.load_vectors(vectors_path, mmap=True)
    similarity_search._build_here(vectors, out, int(n_trees), int(seed), on_disk=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
