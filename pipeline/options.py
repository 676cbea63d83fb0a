"""Command-line options of the similarity pipeline, as a Beam ``PipelineOptions`` view.

Every option a user can pass to ``python -m pipeline.run`` lives here, next to
Beam's own (``--runner``, ``--direct_num_workers``, ``--project``…), so a job is
configured the same way on DirectRunner and on Dataflow.
"""

from __future__ import annotations

from apache_beam.options.pipeline_options import PipelineOptions

DEFAULT_MODEL = "efficientnet_lite0"
DEFAULT_TOP_K = 20
DEFAULT_SEED = 42


class SimilarityOptions(PipelineOptions):
    """Options of the visual-similarity precompute job."""

    @classmethod
    def _add_argparse_args(cls, parser):
        # Not argparse-required: Beam parses every registered options class whenever
        # any PipelineOptions is read, so a required flag would break unrelated
        # pipelines in the same process. pipeline.run checks both are given.
        parser.add_argument(
            "--input",
            help="The catalogue: a file glob of images (product_id = file stem; local or any "
            "Beam FileSystems path such as gs://bucket/images/*.jpg) or a manifest "
            "(.csv, .jsonl or .parquet) with a product id and an image column.",
        )
        parser.add_argument(
            "--output",
            help="Output root (local or FileSystems path): each run writes "
            "ROOT/runs/<run_id>/ and, once verified, ROOT/LATEST points to it.",
        )
        parser.add_argument("--run_id", default=None,
                            help="Name of this run's directory (default: UTC time + suffix).")
        parser.add_argument("--full_rebuild", action="store_true", default=False,
                            help="Embed every image again instead of reusing the previous "
                            "good run's embeddings of unchanged images.")
        parser.add_argument("--keep_runs", type=int, default=7,
                            help="Complete runs kept under the output root (older ones and "
                            "dead incomplete runs are deleted after a successful run).")
        parser.add_argument(
            "--model",
            default=DEFAULT_MODEL,
            help="A registered model name (efficientnet_lite0, efficientnet_lite2, "
            "mobilenet_v2_140_224, raw_pixels_32), a TF-Hub handle URL, or a local "
            "SavedModel directory in the TF-Hub image feature-vector convention.",
        )
        parser.add_argument("--engine", choices=("auto", "tflite", "savedmodel"), default="auto",
                            help="How the model runs: the TFLite/LiteRT interpreter (2-3x "
                            "faster on CPUs), the TensorFlow SavedModel, or auto (TFLite when "
                            "its embeddings match the SavedModel's).")
        parser.add_argument("--embedding_column", default=None,
                            help="A manifest column already holding a vector per product "
                            "(Parquet list<float>, or a JSON array in CSV/JSONL): skips fetch, "
                            "decode and embed; vectors are L2-normalised and stored as is.")
        parser.add_argument("--model_id", default=None,
                            help="With --embedding_column: the id recorded as the vectors' "
                            "model (default 'external').")
        parser.add_argument("--embedding_dim", type=int, default=0,
                            help="With --embedding_column: the vector length; 0 = taken from "
                            "the data (fixed_size_list or the first valid vector).")
        parser.add_argument("--top_k", type=int, default=DEFAULT_TOP_K,
                            help="Neighbours kept per product.")
        parser.add_argument("--id_column", default="product_id",
                            help="Manifest column holding the product id.")
        parser.add_argument("--image_column", default="image",
                            help="Manifest column holding the image path or URL.")
        parser.add_argument("--batch_size", type=int, default=0,
                            help="Images per model call; 0 = what measured fastest for the "
                            "engine on CPUs (TFLite 2, SavedModel 8; see "
                            "bench/embed_throughput.py).")
        parser.add_argument("--model_threads", type=int, default=0,
                            help="Threads per worker for model inference; 0 = cores divided "
                            "by --direct_num_workers (so worker processes do not "
                            "oversubscribe the cores).")
        parser.add_argument("--model_lanes", type=int, default=0,
                            help="Model calls a worker process runs at once, each on its own "
                            "TFLite interpreter sharing --model_threads, while the process "
                            "decodes the next images; 0 = the engine's best (TFLite: one "
                            "single-threaded interpreter per thread; SavedModel: 1).")
        parser.add_argument("--search", choices=("auto", "exact", "ivf", "annoy"), default="auto",
                            help="Neighbour search: exact cosine, an inverted file (IVF: "
                            "k-means lists, exact cosine inside the probed lists), Annoy "
                            "candidates re-ranked by exact cosine, or auto: exact below the "
                            "measured crossover, IVF above it.")
        parser.add_argument("--nlist", type=int, default=0,
                            help="IVF lists; 0 = 4 * sqrt(catalogue size).")
        parser.add_argument("--nprobe", type=int, default=0,
                            help="IVF lists each product searches; 0 = the smallest whose "
                            "coverage measured on the training sample reaches --recall_target.")
        parser.add_argument("--recall_target", type=float, default=0.99,
                            help="recall@top_k the IVF settings aim at; every run estimates its "
                            "recall on a sample and warns when it falls below this.")
        parser.add_argument("--features_only", action="store_true", default=False,
                            help="Only embed: write features/ and errors/, skip the index and "
                            "the neighbours.")
        parser.add_argument("--partition_by", default=None,
                            help="A manifest column (e.g. a category or gender): neighbours "
                            "are only drawn from the same value; one index per value.")
        parser.add_argument("--exclude_same", default=None,
                            help="A manifest column (e.g. a parent product or variant group): "
                            "products sharing a value are never each other's neighbours.")
        parser.add_argument("--min_similarity", type=float, default=None,
                            help="Drop neighbours with a lower cosine similarity.")
        parser.add_argument("--duplicate_threshold", type=float, default=0.97,
                            help="Products this similar (or with identical image bytes) are "
                            "grouped in duplicates/.")
        parser.add_argument("--pca_dim", type=int, default=0,
                            help="Search neighbours in a PCA space of this many dimensions, "
                            "fitted on the run's own vectors (smaller index, often slightly "
                            "better precision); features/ keep the full vectors. 0 = off.")
        parser.add_argument("--eval_label_column", default=None,
                            help="A manifest column of labels (e.g. articleType): the run ends "
                            "by writing evaluation.json with precision@10 by that label, "
                            "recall against exact search and coverage.")
        parser.add_argument("--n_trees", type=int, default=0,
                            help="Annoy trees; 0 = chosen from the catalogue size.")
        parser.add_argument("--search_k", type=int, default=0,
                            help="Annoy search_k; 0 = chosen from n_trees and the candidates.")
        parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                            help="Seed of the Annoy index build (same seed, same output).")
        parser.add_argument("--max_image_pixels", type=int, default=50_000_000,
                            help="Images with more pixels than this are refused before "
                            "decoding (decompression-bomb guard).")
        parser.add_argument("--max_image_bytes", type=int, default=20 * 1024 * 1024,
                            help="Images larger than this many bytes are refused.")
        parser.add_argument("--fetch_concurrency", type=int, default=32,
                            help="Concurrent reads/downloads per worker.")
        parser.add_argument("--fetch_timeout", type=float, default=30.0,
                            help="Read timeout in seconds for one image download.")
        parser.add_argument("--fetch_total_timeout", type=float, default=60.0,
                            help="Longest time in seconds one image download may take in "
                            "all (a host trickling bytes is cut off).")
        parser.add_argument("--fetch_retries", type=int, default=3,
                            help="Retries for connection errors, 429 and 5xx responses.")
        parser.add_argument("--fetch_user_agent", default="visual-similarity-pipeline/0.1",
                            help="User-Agent header sent when downloading images.")
        parser.add_argument("--allow_private_hosts", action="store_true", default=False,
                            help="Allow image URLs on loopback/private/link-local hosts "
                            "(refused by default so a catalogue cannot reach internal "
                            "services).")
        parser.add_argument("--log_level", default=None,
                            choices=("debug", "info", "warning", "error"),
                            help="Show log records of this level and above from every "
                            "library, TensorFlow and Beam included (default: our warnings "
                            "and errors, other libraries' errors only).")
        parser.add_argument("-v", "--verbose", action="store_true", default=False,
                            help="Same as --log_level=info.")
        parser.add_argument("--no_progress", action="store_true", default=False,
                            help="No live progress display while the job runs.")
        parser.add_argument("--progress_interval", type=float, default=30.0,
                            help="Seconds between progress lines when stderr is not a "
                            "terminal (on a terminal one line updates in place).")
        parser.add_argument("--model_cache_dir", default=None,
                            help="Where converted offline models are cached (default: "
                            "$SIMILARITY_CACHE_DIR or ~/.cache/visual-similarity/models).")
        parser.add_argument("--max_product_loss", type=float, default=0.5,
                            help="Publish guard: do not move LATEST when the run embedded "
                            "fewer than (1 - this) times the products of the run LATEST "
                            "points to.")
        parser.add_argument("--max_failed_share", type=float, default=0.5,
                            help="Publish guard: do not move LATEST when more than this share "
                            "of the input rows failed.")
        # --- quality profiles (pipeline/quality.py, issue 20) ---
        parser.add_argument("--quality", choices=("fast", "balanced", "best"), default="fast",
                            help="Neighbour quality recipe: fast (backbone vectors as they "
                            "are), balanced (PCA-256 with partial whitening fitted on the "
                            "catalogue + database-side augmentation over 10 neighbours, no "
                            "extra embedding cost), best (PCA-512 + the same augmentation; "
                            "meant with --model=efficientnet_lite2). See the README's "
                            "quality profiles.")
        parser.add_argument("--whiten_dim", type=int, default=None,
                            help="Override the profile: PCA axes of the search space (0 = off).")
        parser.add_argument("--whiten_power", type=float, default=None,
                            help="Override the profile: each PCA axis scaled by eigenvalue ** "
                            "-power (0 = plain PCA, 0.5 = full whitening).")
        parser.add_argument("--whiten_shrinkage", type=float, default=None,
                            help="Override the profile: added to the eigenvalues before "
                            "whitening, as a multiple of their mean.")
        parser.add_argument("--dba_k", type=int, default=None,
                            help="Override the profile: neighbours averaged into each vector "
                            "(database-side augmentation; 0 = off).")
        parser.add_argument("--dba_alpha", type=float, default=None,
                            help="Override the profile: DBA neighbour weight = similarity ** "
                            "alpha.")
        parser.add_argument("--force_publish", action="store_true", default=False,
                            help="Move LATEST even when the publish guard refuses the run.")
