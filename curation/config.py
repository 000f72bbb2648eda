"""The curation config: a YAML file validated by pydantic before any work starts.

Every section forbids unknown keys, every number carries its bounds, and paths that must exist are checked, so a
typo or an impossible value fails at once with one line naming the key path (``download.timeout_s: ...``).

Relative paths are resolved against the directory the command runs in.  Under ``ray job submit --working-dir``
the job runs in a copy of that directory, so give ``run_root`` as an absolute path (or pass ``--run-root``).
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, ConfigDict, Field, field_validator, model_validator

from curation.config_base import (ConfigError, ConfigModel, Precision, apply_overrides, read_yaml_mapping,
                                  validate_config)
from curation import stages as registry

#: a stage name, or the ``package.module:Class`` of a stage to add (registered, and replaced by its name)
StageName = Annotated[str, AfterValidator(lambda entry: registry.stage_name(entry))]

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveInt = Annotated[int, Field(ge=1)]
Device = Literal["auto", "cpu", "cuda"]
# Precision of the exact k-NN's candidate scores.  float16 / bfloat16 score with a torch matmul (tensor cores on a GPU)
# and every candidate is rescored exactly, so a reduced precision can only lose a true neighbour that its scores did
# not propose: the results can differ from float32's, so the choice is part of a run's identity, and its recall
# against float32 is measured on a sample of each query block and reported.
ScoreDtype = Literal["float32", "float16", "bfloat16"]
SCORE_DTYPE_HELP = ("exact k-NN candidate scoring: float32 (FAISS on CPU, torch on CUDA), or float16 / bfloat16 (a "
                    "torch matmul, for GPUs; candidates rescored exactly, recall vs float32 measured and reported)")


def _must_exist(p: Path) -> Path:
    if not p.exists():
        raise ValueError(f"path does not exist: {p}")
    return p


# Sections are strict (``threads: true`` or ``seed: "3"`` are refused, not converted); paths come from YAML as
# strings, so path fields alone accept them.
LaxPath = Annotated[Path, Field(strict=False)]
ExistingPath = Annotated[Path, Field(strict=False), AfterValidator(_must_exist)]


class Section(ConfigModel):
    """A curation section: strict types, finite numbers, immutable once loaded."""

    model_config = ConfigDict(frozen=True, strict=True, allow_inf_nan=False)


JpegQuality = Annotated[int, Field(ge=1, le=100)]


class InputConfig(Section):
    url_list: list[ExistingPath] = Field(description="Parquet or CSV files (or folders of them) with one URL per row")
    url_col: str = "url"
    caption_col: str | None = "caption"

    @field_validator("url_list", mode="before")
    @classmethod
    def _listify(cls, v):
        return [v] if isinstance(v, (str, Path)) else v

    @field_validator("url_list")
    @classmethod
    def _exist(cls, paths):
        if not paths:
            raise ValueError("at least one URL list is required")
        return paths


class RayConfig(Section):
    address: str | None = Field(None, description="Ray address; null = RAY_ADDRESS or an in-process Ray")
    max_in_flight: PositiveInt = Field(8, description="at most this many workers per stage (Ray actors, each running "
                                                                "one unit at a time, models loaded once)")
    max_retries: Annotated[int, Field(ge=0)] = Field(2, description="retries of a unit that failed or whose worker "
                                                                     "died (a dead worker is restarted as often)")
    local: bool = Field(False, description="run shard tasks in this process, without Ray (debugging)")


class ScaleConfig(Section):
    """How the global steps (dedup's k-NN graph, retrieval's k-NN, k-means and balanced sampling) spread over a Ray
    cluster.

    Run-time choices like ``ray``: every pool runs the same partitioned engine (one partition when it fits), whose
    exact search (rescored, ties to the smaller key) and Lloyd k-means (seeded by global row, summed in fixed point)
    give identical tables at any budget and number of searchers, so they stay out of the run's identity and a run
    may resume with other values.  (IVF: one index is trained on a sample of the whole pool and every partition adds
    its rows to a copy, so IVF-Flat gives the same neighbours at any budget too; IVF-PQ takes each partition's best
    by PQ code, so its recall can only rise with the number of partitions.)"""

    worker_memory_gb: Annotated[float, Field(gt=0)] = Field(
        16.0, description="per-worker memory budget: the vectors of one partition take at most a third of it "
        "(the rest: the search index copy and the Arrow read); a pool that fits is one partition of the same engine")
    query_block: PositiveInt = Field(65_536, description="queries per streamed block (one result file each)")
    searchers: Annotated[int, Field(ge=0)] = Field(
        0, description="partitions held at once (one searcher actor each); 0 = one per GPU, else per CPU of the "
        "cluster")


class ImagesConfig(Section):
    """Image settings every stage that decodes or writes images shares (download, filter, hash, sscd, embed,
    shards)."""

    max_image_pixels: PositiveInt = Field(89_478_485, description="declared pixels above this = decompression bomb")
    max_side: Annotated[int, Field(ge=16)] = Field(
        512, description="pool images are stored with their longer side at most this: downloads, and as-is anchor "
        "images in the final shards")
    jpeg_quality: JpegQuality = Field(
        95, description="every JPEG the pipeline encodes: resized downloads, face-blurred or non-JPEG images the "
        "filter keeps, non-JPEG images in the final shards (as-is anchors); JPEGs kept unchanged are copied")


class DownloadConfig(Section):
    shard_size: PositiveInt = Field(10_000, description="URLs per download shard")
    threads: Annotated[int, Field(ge=1, le=1024)] = Field(32, description="download threads per shard task")
    timeout_s: Annotated[float, Field(gt=0, le=3600)] = Field(10.0, description="per request, seconds")
    deadline_s: Annotated[float, Field(gt=0, le=86400)] | None = Field(
        None, description="wall-clock limit per URL: connect, redirects, headers and body (default 3 x timeout_s)"
    )
    retries: Annotated[int, Field(ge=0)] = 0
    max_bytes: PositiveInt = Field(50_000_000, description="larger downloads are dropped")
    drop_animated: bool = True
    user_agent_token: str = "lvd"
    disallowed_header_directives: list[str] = ["noai", "noimageai"]
    allow_networks: list[str] = Field(
        default_factory=list,
        description="CIDRs exempt from the private-address refusal (tests and the demo allow 127.0.0.1/32)",
    )
    blocklist_domains: list[str] = Field(default_factory=list, description="refused domains, subdomains included")
    blocklist_file: ExistingPath | None = Field(None, description="a text file with one blocked domain per line")
    use_env_proxy: bool = False

    @field_validator("allow_networks")
    @classmethod
    def _cidrs(cls, nets):
        for n in nets:
            try:
                ipaddress.ip_network(n, strict=False)
            except ValueError as err:
                raise ValueError(f"not a network: {n!r} ({err})") from None
        return nets



class FilterConfig(Section):
    min_side: PositiveInt = Field(64, description="drop images whose shorter side is below this")
    max_aspect: Annotated[float, Field(ge=1.0)] = Field(4.0, description="drop images with long/short above this")
    detector: str = Field(
        "nudenet",
        description="'nudenet' (optional extra lvd[detect]), 'none', or 'package.module:Class' implementing "
        "curation.models.detectors.Detector (constructed with no arguments)",
    )
    on_missing_detector: Literal["warn", "fail"] = Field(
        "warn", description="detector 'nudenet' without the extra installed: warn once and skip, or fail at start"
    )
    nsfw_threshold: Fraction = 0.8
    face_threshold: Fraction = 0.5
    blur_faces: bool = True
    batch_size: PositiveInt = Field(32, description="images per detector call")

    @field_validator("detector")
    @classmethod
    def _detector(cls, v):
        import re

        if v not in ("nudenet", "none") and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", v):
            raise ValueError(f"must be 'nudenet', 'none' or 'package.module:Class', got {v!r}")
        return v


class HashConfig(Section):
    method: Literal["pca", "phash"] = "pca"
    bits: PositiveInt = Field(64, description="PCA-hash bits (64 or 128 are typical)")
    thumb_side: Annotated[int, Field(ge=8)] = 32
    hamming_threshold: Annotated[int, Field(ge=0)] = Field(
        6, description="hashes at most this many bits apart are duplicates (demo corpus, 64 bits: resize/JPEG/colour "
        "copies <= 5, unrelated images >= 11)")
    pca_sample: PositiveInt = Field(100_000, description="thumbnails used to fit the principal components")


class SSCDConfig(Section):
    descriptor: Literal["sscd", "pixels"] = Field(
        "sscd", description="the copy-detection descriptor computed: the SSCD model, or 'pixels', a fixed function "
        "of pixels with known quality, for tests and the demo")
    weights: ExistingPath | None = Field(
        None, description="sscd_disc_mixup.torchscript.pt or .torchvision.pt; null = random weights (testing only)"
    )
    preprocess: Literal["square320", "short288"] = "square320"
    batch_size: PositiveInt = 256
    device: Device = "auto"
    num_workers: Annotated[int, Field(ge=0)] = Field(4, description="decode workers (torch DataLoader) per task; on a "
                                                     "CPU device at most one per 8 of the task's cores (curation.cluster.workers)")
    precision: Precision = Field("auto", description="auto = bf16 autocast on CUDA, fp32 on CPU (bf16 applies on "
                                 "CUDA only)")
    channels_last: bool = Field(True, description="channels-last memory format on CUDA (faster convolutions)")



class EvalSetConfig(Section):
    name: str
    path: ExistingPath



class DedupConfig(Section):
    k: PositiveInt = 64
    threshold: Fraction = Field(0.6, description="self-dedup: an edge where cosine similarity > threshold")
    eval_threshold: Fraction = Field(0.45, description="relative dedup against evaluation sets")
    eval_sets: list[EvalSetConfig] = Field(default_factory=list)
    device: Device = Field("auto", description="k-NN search device: faiss on CPU, chunked torch matmul on CUDA")
    score_dtype: ScoreDtype = Field("float32", description=SCORE_DTYPE_HELP + " (stats/dedup_search.json)")
    survivor: Literal["original", "resolution"] = Field(
        "original", description="the image a duplicate component keeps: 'original' = least border/padding fill, then "
        "resolution, then the SSCD medoid, then key (see curation/stages/dedup.py); 'resolution' = largest, then key")
    stats_thresholds: list[Fraction] = Field(
        default_factory=lambda: [0.3, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 0.9],
        description="similarities reported in stats/dedup_thresholds.parquet",
    )

    @model_validator(mode="after")
    def _eval_names(self):
        names = [e.name for e in self.eval_sets]
        if len(set(names)) != len(names):
            raise ValueError(f"evaluation set names must be unique: {names}")
        return self


class EmbedConfig(Section):
    model: str = Field(
        "vit_huge_patch14_224",
        description="a timm model name; 'lvd' for a backbone exported by our trainer (or an official DINOv2 "
        "backbone file); 'pixels' for a fixed pixel-thumbnail descriptor (tests and the demo)",
    )
    checkpoint: ExistingPath | None = Field(None, description="local weights; null = random init (testing only)")
    img_size: PositiveInt = 224
    pooling: Literal["cls", "mean", "both"] = "cls"
    batch_size: PositiveInt = 256
    device: Device = "auto"
    num_workers: Annotated[int, Field(ge=0)] = 4
    precision: Precision = Field("auto", description="auto = bf16 autocast on CUDA, fp32 on CPU")
    prefetch_factor: PositiveInt = Field(4, description="batches each DataLoader worker prepares ahead")
    pixel_bins: Annotated[int, Field(ge=2, le=32)] = Field(12, description="colour-histogram levels per channel of 'pixels'")


    @model_validator(mode="after")
    def _lvd(self):
        if self.model == "lvd" and self.checkpoint is None:
            raise ValueError("model 'lvd' needs a checkpoint (a backbone exported by `lvd export`)")
        return self


class AnchorSetConfig(Section):
    name: str
    path: ExistingPath
    format: Literal["auto", "folder", "webdataset", "parquet"] = "auto"
    method: str = Field("sample", description="how the set retrieves (curation.stages.retrieval_methods): 'sample' "
                        "(k nearest pool images per anchor), 'cluster' (pool clusters the anchors fall in) or 'as_is' "
                        "(the set itself, copied)")
    k: PositiveInt = 4
    clusters: PositiveInt = 100_000
    min_anchors_per_cluster: Annotated[int, Field(ge=0)] = 3
    per_cluster: PositiveInt = 10_000
    cap: PositiveInt = 1_000_000

    @field_validator("method")
    @classmethod
    def _method(cls, m):
        from curation.stages.retrieval_methods import anchor_set_methods

        known = anchor_set_methods()
        if m not in known:
            raise ValueError(f"unknown method {m!r}; an anchor set's method is one of {', '.join(known)}")
        return m

    @field_validator("name")
    @classmethod
    def _safe_name(cls, n):
        if not re.fullmatch(r"[A-Za-z0-9_-]+", n):
            raise ValueError(f"use letters, digits, '_' and '-' only (it names folders and sample keys): {n!r}")
        return n



class BalancedConfig(Section):
    """Hierarchical k-means + balanced sampling of the pool (Vo et al. 2024, arXiv 2405.15613); no anchors."""

    name: str = Field("balanced", description="its name in the selection and stats tables")
    target_size: PositiveInt
    levels: list[PositiveInt] = Field(
        default_factory=lambda: [1000, 100], description="clusters per level, finest first (each clamped)"
    )
    resampling_steps: Annotated[int, Field(ge=0)] = 1
    resample_sizes: list[PositiveInt] | None = Field(
        None, description="per level: points closest to each centroid kept in a resampling step; "
        "null = half the mean cluster size of that level (at least 2)",
    )
    leaf_sampling: Literal["random", "closest"] = Field("random", description="how a leaf cluster fills its budget")

    @model_validator(mode="after")
    def _sizes(self):
        if not self.levels:
            raise ValueError("levels needs at least one level")
        if self.resample_sizes is not None and len(self.resample_sizes) != len(self.levels):
            raise ValueError("resample_sizes needs one entry per level")
        return self


class RetrieveConfig(Section):
    anchor_sets: list[AnchorSetConfig] = Field(default_factory=list)
    balanced: BalancedConfig | None = None
    index: Literal["exact", "ivf_flat", "ivf_pq"] = "exact"
    recall_sample: PositiveInt = 1000
    nlist: Annotated[int, Field(ge=0)] = Field(0, description="IVF lists; 0 = about 4 * sqrt(pool size)")
    nprobe: PositiveInt = Field(32, description="IVF lists visited per query")
    pq_m: Annotated[int, Field(ge=0)] = Field(0, description="PQ sub-quantizers (divides the dim); 0 = dim / 8")
    pq_rerank: Annotated[int, Field(ge=0)] = Field(
        4, description="ivf_pq: re-rank this many x k PQ candidates with the exact vectors (0 or 1 = off)"
    )
    kmeans_iters: PositiveInt = 20
    device: Device = "auto"
    score_dtype: ScoreDtype = Field("float32", description=SCORE_DTYPE_HELP + " (exact search; recall_at_k_vs_exact)")

    @model_validator(mode="after")
    def _names(self):
        names = [a.name for a in self.anchor_sets]
        if self.balanced is not None:
            names.append(self.balanced.name)
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"anchor set names must be unique, repeated: {sorted(dup)}")
        return self


class ShardsConfig(Section):
    samples_per_shard: PositiveInt = 10_000


class ReportConfig(Section):
    grid_anchors: PositiveInt = 8
    grid_neighbors: PositiveInt = 4
    thumb_size: Annotated[int, Field(ge=16)] = Field(96, description="side of a grid image, pixels")


class CurateConfig(Section):
    run_root: LaxPath
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = Field(0, description="numpy/torch seeds take 32 bits")
    stages: list[StageName] = Field(
        default_factory=lambda: list(registry.stage_order()),
        description="the stages to run, by name (run in pipeline order); a 'package.module:Class' entry adds that "
        "stage class (curation.stages.register_stage)")
    input: InputConfig
    ray: RayConfig = RayConfig()
    scale: ScaleConfig = ScaleConfig()
    images: ImagesConfig = ImagesConfig()
    download: DownloadConfig = DownloadConfig()
    filter: FilterConfig = FilterConfig()
    hash: HashConfig = HashConfig()
    sscd: SSCDConfig = SSCDConfig()
    dedup: DedupConfig = DedupConfig()
    embed: EmbedConfig = EmbedConfig()
    retrieve: RetrieveConfig = RetrieveConfig()
    shards: ShardsConfig = ShardsConfig()
    report: ReportConfig = ReportConfig()

    @field_validator("stages")
    @classmethod
    def _ordered(cls, stages):
        if not stages:
            raise ValueError("at least one stage is required")
        if len(set(stages)) != len(stages):
            raise ValueError("a stage is listed twice")
        order = registry.stage_order()
        return sorted(stages, key=order.index)

    def image_sets(self) -> dict[str, list]:
        """The image sets the config names, in config order: ``{"eval": [EvalSetConfig...], "anchors":
        [AnchorSetConfig...]}`` (``dedup.eval_sets``; ``retrieve.anchor_sets``, as-is sets included)."""
        return {"eval": list(self.dedup.eval_sets), "anchors": list(self.retrieve.anchor_sets)}

    def identity(self) -> dict[str, Any]:
        """The part of the config a resumed run must keep: everything but the run-time choices (stages, ray,
        scale; scale changes an IVF index's approximate result, see :class:`ScaleConfig`)."""
        d = self.model_dump(mode="json")
        for k in ("stages", "ray", "scale"):
            d.pop(k)
        return d


# -------------------------------------------------------------------------------------------------------------


# Keys of earlier configs and where they went: such a key is refused with one line saying so.
_IMAGES_KEY = "moved to images.{} (one setting for every stage)"
MOVED_KEYS = {
    "dedup.descriptor": "moved to sscd.descriptor",
    "sscd.bf16": "was replaced by sscd.precision (auto | bf16 | fp32; auto = bf16 on CUDA, as bf16: true was)",
    "ray.cpus_per_task": "was removed (it was never used)",
    "scale.partitioned": "was removed (every pool runs the partitioned engine, one partition when it fits)",
    **{f"{section}.{key}": _IMAGES_KEY.format(key)
       for section, key in (("download", "jpeg_quality"), ("filter", "jpeg_quality"), ("shards", "jpeg_quality"),
                            ("download", "max_image_pixels"), ("filter", "max_image_pixels"),
                            ("download", "max_side"))},
}


def load_config(path: str | Path | None = None, overrides: list[str] = (), data: dict | None = None) -> CurateConfig:
    """Load, override and validate; raise ConfigError with one line naming every bad key path."""
    if data is None:
        data = read_yaml_mapping(path)
    if not isinstance(data, dict):
        raise ConfigError("config error: the top level must be a mapping of sections")
    return validate_config(CurateConfig, apply_overrides(data, list(overrides)), MOVED_KEYS)


def dump_config(cfg: CurateConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def check_resume(cfg: CurateConfig, saved_text: str) -> None:
    """Refuse to continue a run whose saved config differs (outside run-time choices); show a diff."""
    saved = yaml.safe_load(saved_text) or {}
    for k in ("stages", "ray", "scale"):
        saved.pop(k, None)
    a = yaml.safe_dump(saved, sort_keys=True).splitlines()
    b = yaml.safe_dump(cfg.identity(), sort_keys=True).splitlines()
    if a != b:
        diff = "\n".join(difflib.unified_diff(a, b, "RUN/config.yaml (saved)", "this config", lineterm="", n=1))
        raise ConfigError(
            "config error: this run root was started with a different config; use a new run_root or the saved "
            f"config:\n{diff}"
        )
