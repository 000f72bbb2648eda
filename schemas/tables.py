"""The Arrow schema of every table lvd writes.

Writers call :func:`validate` (or :func:`conform`) before a table reaches disk, and tests read tables back and
check them against the same definitions, so a column cannot drift silently.  Nullable columns are marked as such;
everything else must be present and non-null.

Drop reasons are a closed vocabulary per stage, declared on the stage class (``Stage.drop_reasons``): a stage that
wants a new reason adds it there first.
"""

from __future__ import annotations

import pyarrow as pa

# ---------------------------------------------------------------------------------------------------------------
#: download reasons that may not repeat when the URL is fetched again (``--retry-failed``): the network or the
#: server failed, not the content; an ``http_error`` is transient too when its status is 429 or 5xx
TRANSIENT_REASONS = ("network_error", "timeout")

# ---------------------------------------------------------------------------------------------------------------
# Accounting
LEDGER = pa.schema(
    [
        pa.field("stage", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("url", pa.string()),
        pa.field("kept", pa.bool_(), nullable=False),
        pa.field("reason", pa.string()),  # null when kept
        pa.field("detail", pa.string()),
    ]
)
"""One row per input row of a stage unit: the stage's verdict on that key.  Written last, so its presence marks
the unit complete."""

DROPS = pa.schema(
    [
        pa.field("stage", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("url", pa.string()),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
        # a duplicate's survivor (the image of its component that dedup kept; `detail` names its key): its URL, so
        # no join is needed; null for every other drop (eval_contamination has no surviving pool image)
        pa.field("survivor_url", pa.string()),
    ]
)

FUNNEL = pa.schema(
    [
        pa.field("order", pa.int32(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("rows_in", pa.int64(), nullable=False),
        pa.field("kept", pa.int64(), nullable=False),
        pa.field("dropped", pa.int64(), nullable=False),
    ]
)

# ---------------------------------------------------------------------------------------------------------------
# download
DOWNLOAD_STATUS = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("row_id", pa.int64(), nullable=False),
        pa.field("url", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("status", pa.string(), nullable=False),  # success | dropped
        pa.field("reason", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("original_width", pa.int32()),
        pa.field("original_height", pa.int32()),
        pa.field("sha256", pa.string()),  # of the bytes as downloaded
    ]
)

# ---------------------------------------------------------------------------------------------------------------
# hash / sscd / dedup
HASHES = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("pixel_sha256", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("thumb", pa.binary(), nullable=False),  # grayscale thumbnail, uint8, row-major side*side
        # share of the image that is uniform fill joined to its edges (border, padding, rotation corners)
        pa.field("border_fill", pa.float32(), nullable=False),
        # size before download's resize (from the sample json), the resolution of dedup's survivor rule
        pa.field("original_width", pa.int32()),
        pa.field("original_height", pa.int32()),
        # the survivor rule's encoding measurements: IJG quality from the JPEG quantisation tables (null: not a
        # JPEG), encoded bytes per decoded pixel, variance of the Laplacian
        pa.field("jpeg_quality", pa.int16()),
        pa.field("bytes_per_pixel", pa.float32()),
        pa.field("sharpness", pa.float32()),
        # grayscale copy, at most 64 px on the longer side, aspect kept: the survivor rule's containment test
        pa.field("canvas", pa.binary()),
        pa.field("canvas_width", pa.int16()),
        pa.field("canvas_height", pa.int16()),
    ]
)

DESCRIPTORS = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # "pool" or "eval/<set>" or "anchors/<set>"
        pa.field("embedding", pa.list_(pa.float32()), nullable=False),
    ]
)
"""Descriptor / embedding tables (sscd/, embed/): one fixed-length float32 vector per key."""

EMBED_FAILURES = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),  # the decode_image reason (undecodable, truncated...)
        pa.field("detail", pa.string()),
    ]
)
"""embed/<pool|anchors/<set>|eval/<set>>/failed/part-NNNNN.parquet: images the embedder could not decode; retrieve
drops such pool keys with reason ``embed_failed``."""

COMPONENTS = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("component", pa.int64(), nullable=False),
        pa.field("component_size", pa.int64(), nullable=False),
        pa.field("kept", pa.bool_(), nullable=False),
        pa.field("reason", pa.string()),
        pa.field("nearest_key", pa.string()),
        pa.field("nearest_similarity", pa.float32()),
    ]
)

HASH_GROUPS = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("pixel_sha256", pa.string(), nullable=False),
        pa.field("hash", pa.binary(), nullable=False),  # packed bits: the PCA hash (or the pHash)
        pa.field("group", pa.int64(), nullable=False),  # smallest row index in the duplicate group
        pa.field("group_size", pa.int64(), nullable=False),
    ]
)
"""hash/groups.parquet: every image the hash stage saw, with its hash group (same pixels or close hash codes); the
groups are edges of the dedup stage's duplicate graph, which decides what is kept."""

DEDUP_THRESHOLDS = pa.schema(
    [
        pa.field("kind", pa.string(), nullable=False),  # "self" (pool -> pool) or "eval/<set>" (pool -> eval set)
        pa.field("threshold", pa.float32(), nullable=False),
        pa.field("images_above", pa.int64(), nullable=False),  # pool images whose nearest similarity > threshold
        pa.field("fraction_above", pa.float64(), nullable=False),
        pa.field("edges_above", pa.int64(), nullable=False),  # k-NN edges with similarity > threshold
    ]
)
"""stats/dedup_thresholds.parquet: how many pool images would be caught at each similarity threshold."""

COMPONENT_SIZES = pa.schema(
    [
        pa.field("component_size", pa.int64(), nullable=False),
        pa.field("components", pa.int64(), nullable=False),
        pa.field("images", pa.int64(), nullable=False),
        pa.field("with_eval", pa.int64(), nullable=False),  # components of this size holding an eval image
    ]
)
"""stats/component_sizes.parquet: the histogram of dedup component sizes (pool and eval images together)."""

# ---------------------------------------------------------------------------------------------------------------
# retrieve
NEIGHBORS = pa.schema(
    [
        pa.field("anchor_set", pa.string(), nullable=False),
        pa.field("anchor_key", pa.string(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("pool_key", pa.string(), nullable=False),
        pa.field("similarity", pa.float32(), nullable=False),
    ]
)

SELECTION = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # "pool" or "anchors/<set>" for as_is sets
        pa.field("url", pa.string()),
        pa.field("anchor_set", pa.string(), nullable=False),
        pa.field("anchor_key", pa.string()),
        pa.field("rank", pa.int32()),
        pa.field("similarity", pa.float32()),
        pa.field("cluster", pa.int64()),
    ]
)

RETRIEVAL_STATS = pa.schema(
    [
        pa.field("anchor_set", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        pa.field("anchors", pa.int64(), nullable=False),
        pa.field("retrieved", pa.int64(), nullable=False),
        pa.field("unique", pa.int64(), nullable=False),
        pa.field("overlap_other_sets", pa.int64(), nullable=False),
        pa.field("similarity_p05", pa.float32()),
        pa.field("similarity_p50", pa.float32()),
        pa.field("similarity_p95", pa.float32()),
        pa.field("recall_at_k_vs_exact", pa.float32()),
    ]
)

CLUSTER_STATS = pa.schema(
    [
        pa.field("anchor_set", pa.string(), nullable=False),
        pa.field("cluster", pa.int64(), nullable=False),
        pa.field("size", pa.int64(), nullable=False),
        pa.field("anchors", pa.int64(), nullable=False),
        pa.field("selected", pa.int64(), nullable=False),
    ]
)

ABLATION = pa.schema(
    [
        pa.field("seed", pa.int64(), nullable=False),  # the training seed (both arms)
        pa.field("eval_set", pa.string(), nullable=False),
        pa.field("eval_images", pa.int64(), nullable=False),  # labelled held-out images the k-NN is scored on
        pa.field("train_images", pa.int64(), nullable=False),  # each arm's training set (curated = random)
        pa.field("curated_knn_top1", pa.float64(), nullable=False),
        pa.field("random_knn_top1", pa.float64(), nullable=False),
        pa.field("raw_pixels_knn_top1", pa.float64(), nullable=False),
        pa.field("curated_target_share", pa.float64(), nullable=False),  # share of the target domain
        pa.field("random_target_share", pa.float64(), nullable=False),
    ]
)
"""stats/ablation.parquet, written by a curation ablation (bench/curation_ablation.py) into the run whose shards
it trained on: per training seed, the k-NN top-1 on the labelled evaluation set of the teacher trained on the
curated shards and of the same recipe trained on a random pool subset of the same size, raw pixels' k-NN, and
each training set's share of the target domain."""

SHARD_INDEX = pa.schema(
    [
        pa.field("shard", pa.string(), nullable=False),  # lvd-NNNNNN.tar under shards/
        pa.field("sample_key", pa.string(), nullable=False),  # the key inside the tar
        pa.field("key", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("anchor_set", pa.string(), nullable=False),
    ]
)
"""shards_meta/index.parquet: where each selected image went (sample_key: the key in the tar and its json; key: the
image's key in its source, as in retrieve/selection.parquet)."""

TAR_INDEX = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("ext", pa.string(), nullable=False),
        pa.field("offset", pa.int64(), nullable=False),  # byte offset of the member's data in the tar
        pa.field("size", pa.int64(), nullable=False),
    ]
)
"""_tarindex/<stage>/NNNNN.parquet: members of a WebDataset tar, for random access by key."""

SCHEMAS: dict[str, pa.Schema] = {
    "ledger": LEDGER,
    "drops": DROPS,
    "funnel": FUNNEL,
    "download_status": DOWNLOAD_STATUS,
    "hashes": HASHES,
    "descriptors": DESCRIPTORS,
    "embed_failures": EMBED_FAILURES,
    "components": COMPONENTS,
    "hash_groups": HASH_GROUPS,
    "dedup_thresholds": DEDUP_THRESHOLDS,
    "component_sizes": COMPONENT_SIZES,
    "neighbors": NEIGHBORS,
    "selection": SELECTION,
    "retrieval_stats": RETRIEVAL_STATS,
    "cluster_stats": CLUSTER_STATS,
    "ablation": ABLATION,
    "shard_index": SHARD_INDEX,
    "tar_index": TAR_INDEX,
}


class SchemaError(ValueError):
    pass


def conform(table: pa.Table, schema: pa.Schema | str) -> pa.Table:
    """Return `table` with exactly `schema`'s columns, in order and types; raise SchemaError naming the problem.

    Columns missing from the table, extra columns, casts that lose information and nulls in non-nullable columns
    are all errors."""
    if isinstance(schema, str):
        schema = SCHEMAS[schema]
    missing = [f.name for f in schema if f.name not in table.column_names]
    extra = [c for c in table.column_names if c not in schema.names]
    if missing or extra:
        raise SchemaError(f"table does not match schema: missing columns {missing}, unexpected columns {extra}")
    columns = []
    for field in schema:
        col = table.column(field.name)
        if not col.type.equals(field.type):
            try:
                col = col.cast(field.type, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
                raise SchemaError(f"column {field.name!r}: cannot cast {col.type} to {field.type}: {err}") from err
        if not field.nullable and col.null_count:
            raise SchemaError(f"column {field.name!r} is not nullable but holds {col.null_count} nulls")
        columns.append(col)
    return pa.Table.from_arrays(columns, schema=schema)


def validate(table: pa.Table, schema: pa.Schema | str) -> None:
    """Raise SchemaError unless `table` already has exactly `schema` (names, order, types, no illegal nulls)."""
    if isinstance(schema, str):
        schema = SCHEMAS[schema]
    if not table.schema.remove_metadata().equals(schema.remove_metadata()):
        raise SchemaError(f"schema mismatch:\n  got      {table.schema}\n  expected {schema}")
    for field in schema:
        if not field.nullable and table.column(field.name).null_count:
            raise SchemaError(f"column {field.name!r} is not nullable but holds nulls")


def empty(schema: pa.Schema | str) -> pa.Table:
    if isinstance(schema, str):
        schema = SCHEMAS[schema]
    return schema.empty_table()
