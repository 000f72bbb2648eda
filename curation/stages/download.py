"""download: URL lists -> WebDataset shards, one status row per URL.

Planning (in the driver, once): read the URL lists, number every row (``row_id``, its key is the zero-padded
row id, stable across reruns), refuse malformed URLs, repeated URLs, blocklisted domains and literal private IPs
before any fetch (ledger unit ``precheck``), and cut the rest into shards of ``download.shard_size`` rows, written
as Arrow IPC files under ``download/_inputs/``.

Each shard is one task: img2dataset's per-shard ``Downloader`` fetches with its thread pool (and its
``X-Robots-Tag`` opt-out check), through a urllib opener that re-checks every connection and redirect against the
address policy (:mod:`curation.urlsafety`).  Bytes are decoded by :func:`curation.images.decode_image` (our
"resizer": bombs, truncation, animation, CMYK/16-bit/alpha handled there), resized to ``max_side`` and stored as
JPEG.  Outputs, each written atomically: ``NNNNN.tar`` (``key.jpg`` + ``key.json``), ``NNNNN.parquet`` (status
rows, schema ``download_status``: one per input URL of the shard's row range, those refused before the fetch
included), then the ledger part that marks the shard complete.
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset imports albumentations, which phones home

import json
import re
import urllib.request
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from curation import accounting
from curation.images import ImageRejected, decode_image, encode_jpeg, resize_max_side
from curation.stages.base import Stage, Unit
from curation.storage import TarShardWriter, atomic_path, temporary_link, write_json, write_table
from curation.urllists import read_url_lists
from curation.urlsafety import Refused, UrlPolicy, install_safe_opener

KEY_DIGITS = 10


def make_key(row_id: int) -> str:
    return f"{row_id:0{KEY_DIGITS}d}"


_HTTP = re.compile(r"HTTP Error (\d{3})")


def reason_from_error(message: str) -> tuple[str, str]:
    """Map an img2dataset/urllib error message to (reason, detail)."""
    m = re.search(r"lvd:([a-z_]+): ?(.*)", message, re.S)
    if m:
        reason, detail = m.group(1), m.group(2).rstrip(">").strip()
        return reason, detail
    if "X-Robots-Tag" in message:
        return "opted_out", message
    m = _HTTP.search(message)
    if m:
        return "http_error", message
    low = message.lower()
    if "timed out" in low or "timeout" in low:
        return "timeout", message
    return "network_error", message


class ImageNormalizer:
    """img2dataset 'resizer': bytes -> (jpeg, w, h, orig_w, orig_h, error) using our decoder."""

    def __init__(self, cfg, images):
        self.cfg, self.images = cfg, images

    def __call__(self, img_stream, blurring_bbox_list=None):
        data = img_stream.read()
        cfg = self.cfg
        try:
            im, (ow, oh) = decode_image(
                data, self.images.max_image_pixels, cfg.drop_animated, draft_size=cfg.max_side, orient=True
            )
            im = resize_max_side(im, cfg.max_side)
            return encode_jpeg(im, self.images.jpeg_quality), im.width, im.height, ow, oh, None
        except ImageRejected as err:
            return None, None, None, None, None, f"lvd:{err.reason}: {err.detail}"


class _ShardWriter:
    """img2dataset sample-writer interface, writing our tar and collecting status rows."""

    def __init__(self, shard_id, output_folder, save_caption, oom_shard_count, schema, encode_format, *, sink):
        self.sink = sink
        self.tar = TarShardWriter(sink["tar"])

    def write(self, img_str, key, caption, meta):
        status = meta.get("status")
        err = meta.get("error_message")
        lvd_key = meta["lvd_key"]
        row = {
            "key": lvd_key, "row_id": int(meta["row_id"]), "url": meta.get("url"), "caption": caption,
            "status": "success" if status == "success" else "dropped", "reason": None, "error_message": err,
            "width": meta.get("width"), "height": meta.get("height"),
            "original_width": meta.get("original_width"), "original_height": meta.get("original_height"),
            "sha256": meta.get("sha256"),
        }
        if status == "success":
            info = {k: row[k] for k in ("key", "url", "caption", "width", "height", "original_width",
                                        "original_height", "sha256")}
            self.tar.write(lvd_key, {"jpg": img_str, "json": info})
        else:
            row["reason"], row["error_message"] = reason_from_error(err or "unknown error")
        self.sink["rows"].append(row)

    def close(self):
        self.tar.close()


class DownloadStage(Stage):
    name = "download"

    def __init__(self, cfg, root=None):
        super().__init__(cfg, root)
        self.dl = cfg.download
        self.inputs = self.dir / "_inputs"

    # -- planning ----------------------------------------------------------------------------------------------
    def plan(self) -> list[Unit]:
        plan_file = self.inputs / "plan.json"
        if not plan_file.exists():
            self._make_plan(plan_file)
        plan = json.loads(plan_file.read_text())
        lost = [s for s, _ in plan["shards"] if not (self.inputs / f"{s}.arrow").exists()]
        if lost or not accounting.ledger_path(self.root, self.name, "precheck").exists():
            # an input shard or the precheck drops were deleted: planning is deterministic, so redo it (never
            # shrink the accounting), and refuse if it no longer gives the same plan
            self._make_plan(plan_file)
            again = json.loads(plan_file.read_text())
            if again != plan:
                raise RuntimeError(f"{plan_file}: re-planning the lost inputs gave a different plan (the URL lists "
                                   "changed since the run started); use a new run_root")
        return [Unit(s, {"rows": n}) for s, n in plan["shards"]]

    def _make_plan(self, plan_file: Path) -> None:
        table = read_url_lists(self.cfg.input.url_list, self.cfg.input.url_col, self.cfg.input.caption_col)
        policy = UrlPolicy.from_config(self.dl)
        seen: dict[str, int] = {}
        keys, urls, reasons, details, ok = [], [], [], [], []
        rows = zip(table["row_id"].to_pylist(), table["url"].to_pylist(), table["url_error"].to_pylist())
        for row_id, url, url_error in rows:
            reason = detail = None
            try:
                if url_error:
                    raise Refused("bad_url", url_error)
                policy.check_url(url)
            except Refused as err:
                reason, detail = err.reason, err.detail
            if reason is None:
                if url in seen:
                    reason, detail = "duplicate_url", f"same URL as key {make_key(seen[url])}"
                else:
                    seen[url] = row_id
            keys.append(make_key(row_id))
            urls.append(url)
            reasons.append(reason)
            details.append(detail)
            ok.append(reason is None)
        refused = accounting.make_ledger("download", keys, urls, reasons, details)
        refused = refused.filter(pa.compute.invert(refused["kept"]))
        keep = table.drop_columns(["url_error"]).filter(pa.array(ok, pa.bool_()))
        keep = keep.append_column("lvd_key", pa.array([make_key(r) for r in keep["row_id"].to_pylist()], pa.string()))
        self.inputs.mkdir(parents=True, exist_ok=True)
        shards, row_ranges = [], {}
        # at least one shard when there are rows at all: its status table also lists the URLs refused before fetch
        starts = range(0, keep.num_rows or min(table.num_rows, 1), self.dl.shard_size)
        for i, start in enumerate(starts):
            part = keep.slice(start, self.dl.shard_size)
            sid = f"{i:05d}"
            with atomic_path(self.inputs / f"{sid}.arrow") as tmp:
                with ipc.new_file(tmp, part.schema) as w:
                    w.write_table(part)
            shards.append((sid, part.num_rows))
            # input rows [lo, hi) belong to this shard: its fetched rows and the refused ones between them
            nxt = start + self.dl.shard_size
            row_ranges[sid] = [0 if i == 0 else keep["row_id"][start].as_py(),
                               keep["row_id"][nxt].as_py() if nxt < keep.num_rows else table.num_rows]
        accounting.write_ledger(self.root, "download", "precheck", refused)
        write_json(plan_file, {"shards": shards, "rows": table.num_rows, "refused_before_fetch": refused.num_rows,
                               "row_ranges": row_ranges})

    def _refused_status_rows(self, unit: Unit) -> list[dict]:
        """Status rows for the URLs of this shard's row range that were refused before any fetch."""
        lo, hi = json.loads((self.inputs / "plan.json").read_text())["row_ranges"][unit.id]
        ledger = pq.read_table(  # keys are sorted: row-group statistics skip the other shards' rows
            accounting.ledger_path(self.root, self.name, "precheck"),
            filters=(pc.field("key") >= make_key(lo)) & (pc.field("key") < make_key(hi)),
        )
        return [
            {"key": r["key"], "row_id": int(r["key"]), "url": r["url"], "caption": None, "status": "dropped",
             "reason": r["reason"], "error_message": r["detail"], "width": None, "height": None,
             "original_width": None, "original_height": None, "sha256": None}
            for r in ledger.to_pylist()
        ]

    # -- one shard ---------------------------------------------------------------------------------------------
    def is_done(self, unit: Unit) -> bool:
        return accounting.ledger_path(self.root, self.name, unit.id).exists()

    def run_unit(self, unit: Unit) -> dict:
        previous_opener = urllib.request._opener  # restored after: in-process runs must not leak the policy
        install_safe_opener(UrlPolicy.from_config(self.dl), self.dl.use_env_proxy, self.dl.max_bytes,
                            self.dl.deadline_s or 3 * self.dl.timeout_s)
        try:
            return self._download(unit)
        finally:
            urllib.request.install_opener(previous_opener)

    def _download(self, unit: Unit) -> dict:
        from img2dataset.downloader import Downloader

        sink = {"tar": self.dir / f"{unit.id}.tar", "rows": []}
        columns = ["url", "caption", "lvd_key", "row_id"]
        downloader = Downloader(
            sample_writer_class=partial(_ShardWriter, sink=sink),
            resizer=ImageNormalizer(self.dl, self.cfg.images),
            thread_count=self.dl.threads,
            save_caption=True,
            extract_exif=False,
            output_folder=str(self.dir),
            column_list=columns,
            timeout=self.dl.timeout_s,
            number_sample_per_shard=max(self.dl.shard_size, 10),
            oom_shard_count=5,
            compute_hash="sha256",
            verify_hash_type=None,
            encode_format="jpg",
            retries=self.dl.retries,
            user_agent_token=self.dl.user_agent_token,
            disallowed_header_directives=self.dl.disallowed_header_directives,
        )
        # img2dataset deletes the shard file it was given: hand it a temporary link, so the input outlives the
        # unit's completion marker (a unit killed after that delete, or whose ledger is removed, can be redone).
        with temporary_link(self.inputs / f"{unit.id}.arrow") as consumable:
            ok, _ = downloader((int(unit.id), str(consumable)))
        if not ok:
            raise RuntimeError(f"img2dataset failed on shard {unit.id} (traceback above)")
        rows = sorted(sink["rows"], key=lambda r: r["row_id"])
        if len(rows) != unit.payload["rows"]:
            raise RuntimeError(f"shard {unit.id}: {len(rows)} status rows for {unit.payload['rows']} URLs")
        status = sorted(rows + self._refused_status_rows(unit), key=lambda r: r["row_id"])
        write_table(self.dir / f"{unit.id}.parquet", pa.Table.from_pylist(status), "download_status")
        ledger = accounting.make_ledger(
            "download", [r["key"] for r in rows], [r["url"] for r in rows], [r["reason"] for r in rows],
            [r["error_message"] if r["reason"] else None for r in rows],
        )
        accounting.write_ledger(self.root, self.name, unit.id, ledger)
        n_ok = sum(r["status"] == "success" for r in rows)
        return {"ok": n_ok, "failed": len(rows) - n_ok}
