"""Near-duplicate product groups: byte-identical images or near-identical embeddings.

Catalogues list the same photo under several products (re-uploads, colour
variants shot once, marketplace copies). Two products are linked when their
image bytes are identical (same sha256) or their cosine similarity is at or
above ``--duplicate_threshold``; the connected groups are written to
``duplicates/duplicates-00000-of-00001.jsonl``, one group per line, largest
first, as ``{"products": [...], "size": n, "identical_bytes": bool (all share one
image file), "same_image_bytes": [[ids with identical bytes], ...],
"min_link_similarity": s}``.
"""

from __future__ import annotations

import itertools
import zlib

import apache_beam as beam

from pipeline import files
from pipeline.run_layout import DUPLICATES_DIR, DUPLICATES_FILE


def _identical_pairs(keyed):
    sha256, product_ids = keyed
    product_ids = sorted(set(product_ids))
    first = product_ids[0]
    for other in product_ids[1:]:
        yield (first, other, 1.0, sha256)


def group_pair_blocks(blocks) -> list[dict]:
    """Connected groups of linked products (union-find), in a deterministic order.

    Pairs are (product_a, product_b, similarity, sha256 or None): a sha256
    marks a byte-identical link; a group is ``identical_bytes`` when all of its
    products share one image file content. They come in blocks (lists), which
    must be re-iterable (a list, or a grouped value of Beam's
    GroupByKey): the first pass links the products, the second collects each
    group's products, similarities and identical-bytes sets, so no list of
    every pair is built beside the input. The result does not depend on the
    order of the blocks or of the pairs in them: each group's root is its
    smallest product id, and everything in a group is sorted.
    """
    parent: dict[str, str] = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b, _, _ in itertools.chain.from_iterable(blocks):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[str, dict] = {}
    for a, b, similarity, sha256 in itertools.chain.from_iterable(blocks):
        root = find(a)
        group = groups.get(root)
        if group is None:
            group = groups[root] = {"products": set(), "by_sha": {}, "min": similarity}
        group["products"].update((a, b))
        group["min"] = min(group["min"], similarity)
        if sha256 is not None:
            group["by_sha"].setdefault(sha256, set()).update((a, b))
    out = []
    for group in groups.values():
        products = sorted(group["products"])
        same_bytes = sorted(sorted(ids) for ids in group["by_sha"].values())
        out.append({"products": products, "size": len(products),
                    "identical_bytes": same_bytes == [products],
                    "same_image_bytes": same_bytes,
                    "min_link_similarity": round(group["min"], 4)})
    return sorted(out, key=lambda g: (-g["size"], g["products"][0]))


def _sha_buckets(block, buckets: int):
    """A block of feature rows → (bucket of sha256, (sha256s, product ids)) per bucket."""
    shas = block.batch.column("sha256").to_pylist()
    ids = block.batch.column("product_id").to_pylist()
    parts: dict = {}
    for sha, pid in zip(shas, ids):
        part = parts.setdefault(zlib.crc32(str(sha).encode("utf-8")) % buckets, ([], []))
        part[0].append(sha)
        part[1].append(pid)
    return sorted(parts.items())


def _identical_in_bucket(keyed) -> list:
    """One sha256 bucket's identical-bytes pairs as one block (the row-wise path's pairs)."""
    _, parts = keyed
    by_sha: dict = {}
    for shas, ids in parts:
        for sha, pid in zip(shas, ids):
            by_sha.setdefault(sha, []).append(pid)
    return [pair for sha in sorted(by_sha, key=str) if len(by_sha[sha]) > 1
            for pair in _identical_pairs((sha, by_sha[sha]))]


class WriteDuplicateGroups(beam.PTransform):
    """(feature rows, near-duplicate pairs) → ``duplicates/*.jsonl``; yields the group count.

    With ``buckets`` > 0 the features are blocks of rows (the precomputed-vectors
    path): identical sha256s are found per hash bucket of the sha256, so the
    grouping moves ``blocks x buckets`` lists instead of one element per product.
    """

    def __init__(self, run_dir: str, buckets: int = 0):
        super().__init__()
        self._path = files.join(run_dir, DUPLICATES_DIR, DUPLICATES_FILE)
        self._buckets = buckets

    def expand(self, inputs):
        """``(features, near-duplicate blocks)``: each block a list of ``(a, b, similarity)``."""
        features, similar_blocks = inputs
        if self._buckets:
            buckets = self._buckets
            identical = (features
                         | "BySha256" >> beam.FlatMap(_sha_buckets, buckets)
                         | "GroupSha256" >> beam.GroupByKey()
                         | "IdenticalPairs" >> beam.Map(_identical_in_bucket))
        else:
            identical = (features
                         | "BySha256" >> beam.Map(lambda f: (f.sha256, f.product_id))
                         | "GroupSha256" >> beam.GroupByKey()
                         | "IdenticalPairs" >> beam.Map(
                             lambda keyed: list(_identical_pairs(keyed))))
        similar = similar_blocks | "MarkSimilar" >> beam.Map(
            lambda block: [(a, b, s, None) for a, b, s in block])
        path = self._path

        def write(keyed):
            groups = group_pair_blocks(keyed[1])
            files.write_jsonl(path, groups)
            yield len(groups)

        # Every block under one key, plus one empty block so that a run without any pair
        # still writes the file. A GroupByKey, not a combine or a side input: Beam's
        # CombineGlobally hands its result on through a side input, and a side input is
        # sized for the cache by walking every object in it (seconds for a large catalogue's
        # pairs: bench/MEASUREMENTS.md, "Duplicate pairs to the group writer"); a grouped
        # value is streamed to the one writer.
        blocks = ((identical, similar) | "AllPairs" >> beam.Flatten()
                  | "Filled" >> beam.Filter(len))
        empty = features.pipeline | "Once" >> beam.Impulse() | "NoPairs" >> beam.Map(
            lambda _: [])
        return ((blocks, empty)
                | "AllBlocks" >> beam.Flatten()
                | "OneKey" >> beam.Map(lambda block: (0, block))
                | "CollectPairs" >> beam.GroupByKey()
                | "Write" >> beam.FlatMap(write))
