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


def group_pairs(pairs) -> list[dict]:
    """Connected groups of linked products (union-find), in a deterministic order.

    ``pairs`` are (product_a, product_b, similarity, sha256 or None): a sha256
    marks a byte-identical link. A group is ``identical_bytes`` when all of its
    products share one image file content.
    """
    parent: dict[str, str] = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    links = []
    for a, b, similarity, sha256 in pairs:
        links.append((a, b, similarity, sha256))
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[str, dict] = {}
    for a, b, similarity, sha256 in links:
        group = groups.setdefault(find(a), {"products": set(), "by_sha": {}, "sims": []})
        group["products"].update((a, b))
        group["sims"].append(similarity)
        if sha256 is not None:
            group["by_sha"].setdefault(sha256, set()).update((a, b))
    out = []
    for group in groups.values():
        products = sorted(group["products"])
        same_bytes = sorted(sorted(ids) for ids in group["by_sha"].values())
        out.append({"products": products, "size": len(products),
                    "identical_bytes": same_bytes == [products],
                    "same_image_bytes": same_bytes,
                    "min_link_similarity": round(min(group["sims"]), 4)})
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


def _identical_in_bucket(keyed):
    """All identical-bytes pairs of one sha256 bucket (same pairs as the row-wise path)."""
    _, parts = keyed
    by_sha: dict = {}
    for shas, ids in parts:
        for sha, pid in zip(shas, ids):
            by_sha.setdefault(sha, []).append(pid)
    for sha in sorted(by_sha, key=str):
        if len(by_sha[sha]) > 1:
            yield from _identical_pairs((sha, by_sha[sha]))


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
        features, similar_pairs = inputs
        if self._buckets:
            buckets = self._buckets
            identical = (features
                         | "BySha256" >> beam.FlatMap(_sha_buckets, buckets)
                         | "GroupSha256" >> beam.GroupByKey()
                         | "IdenticalPairs" >> beam.FlatMap(_identical_in_bucket))
        else:
            identical = (features
                         | "BySha256" >> beam.Map(lambda f: (f["sha256"], f["product_id"]))
                         | "GroupSha256" >> beam.GroupByKey()
                         | "IdenticalPairs" >> beam.FlatMap(_identical_pairs))
        similar = similar_pairs | "MarkSimilar" >> beam.Map(lambda p: (p[0], p[1], p[2], None))
        path = self._path

        def write(pairs):
            groups = group_pairs(pairs)
            files.write_jsonl(path, groups)
            yield len(groups)

        pairs = (identical, similar) | "AllPairs" >> beam.Flatten()
        # Once, with every pair in one list (none at all still gives one empty list, so the
        # file is always written). A main input, not a side input: Beam sizes a side input
        # for its cache by walking every object in it (~20 s for 500k products' pairs).
        return (pairs
                | "CollectPairs" >> beam.combiners.ToList()
                | "Write" >> beam.FlatMap(write))
