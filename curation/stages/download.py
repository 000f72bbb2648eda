"""download: URL lists -> WebDataset shards, one status row per URL.

Planning (in the driver, once): read the URL lists, number every row (``row_id``, its key is the zero-padded
row id, stable across reruns), refuse malformed URLs, repeated URLs, blocklisted domains and literal private IPs
before any fetch (ledger unit ``precheck``), and cut the rest into shards of ``download.shard_size`` rows, written
as Arrow IPC files under ``download/_inputs/``.

Each shard is one unit: img2dataset's per-shard ``Downloader`` fetches with its thread pool (and its
``X-Robots-Tag`` opt-out check), through a urllib opener that re-checks every connection and redirect against the
address policy (:mod:`curation.rules.urlsafety`).  Bytes are decoded by :func:`curation.data.images.decode_image` (our
"resizer": bombs, truncation, animation, CMYK/16-bit/alpha handled there), resized to ``images.max_side`` and stored
as JPEG.  Outputs, each written atomically: ``NNNNN.tar`` (``key.jpg`` + ``key.json``), ``NNNNN.parquet`` (status
rows, schema ``download_status``: one per input URL of the shard's row range, those refused before the fetch
included), then the ledger part that marks the shard complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from functools import partial

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from curation.pipeline import accounting
from curation.data.images import ImageRejected, decode_image, encode_jpeg, resize_max_side
from curation.stages.base import Stage, Unit
from curation.pipeline.storage import (TarShardWriter, atomic_path, iter_tar_samples, temporary_link, write_json,
                             write_table)
from curation.data.urllists import iter_url_batches
from curation.rules.urlsafety import Refused, UrlPolicy, safe_urlopen
from schemas import conform
from schemas.tables import TRANSIENT_REASONS

KEY_DIGITS = 10


def make_key(row_id: int) -> str:
    return f"{row_id:0{KEY_DIGITS}d}"


def img2dataset_downloader():
    """img2dataset's per-shard ``Downloader`` class.  img2dataset imports albumentations, which asks pypi.org for
    its latest version on import unless ``NO_ALBUMENTATIONS_UPDATE`` is set: this is the one place lvd sets it
    (a value already in the environment is kept), right before the import, so that nothing phones home."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset.downloader import Downloader

    return Downloader


def precheck(row_ids: list[int], urls: list, url_errors: list, policy: UrlPolicy, seen: dict | None = None,
             may_repeat=None) -> list[tuple[str | None, str | None]]:
    """The verdict (reason, detail) on each input row before any fetch, (None, None) for a row to fetch: a row the
    URL list could not decode (``url_error``), a URL the policy refuses, or a repeat of an earlier row's URL.
    `seen` ({url: row id}) carries the URLs of earlier batches; `may_repeat(url)`, when given, says which URLs can
    occur again at all (only those are remembered)."""
    seen = {} if seen is None else seen
    verdicts = []
    for row_id, url, url_error in zip(row_ids, urls, url_errors):
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
            elif may_repeat is None or may_repeat(url):
                seen[url] = row_id
        verdicts.append((reason, detail))
    return verdicts


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


def is_transient(reason: str | None, detail: str | None) -> bool:
    """Whether a download drop may succeed when fetched again: the network failed, the request timed out, or the
    server answered 429 (too many requests) or a 5xx (its own error).  Other drops would repeat."""
    if reason in TRANSIENT_REASONS:
        return True
    if reason == "http_error":
        m = _HTTP.search(detail or "")
        return bool(m) and (int(m.group(1)) == 429 or 500 <= int(m.group(1)) <= 599)
    return False


def repeated_hashes(url_batches) -> set[int]:
    """The values of Python's ``hash`` (stable within one process) that more than one URL of `url_batches` (lists
    of URLs) has: 8 bytes per URL and one sort, instead of a set of every URL."""
    import numpy as np

    hashes = np.concatenate([np.fromiter((hash(u) for u in urls), np.int64, len(urls)) for urls in url_batches]
                            or [np.zeros(0, np.int64)])
    hashes.sort()
    return set(hashes[1:][hashes[1:] == hashes[:-1]].tolist())


def _empty_input_shard() -> pa.Table:
    return pa.table({"row_id": pa.array([], pa.int64()), "url": pa.array([], pa.string()),
                     "caption": pa.array([], pa.string()), "lvd_key": pa.array([], pa.string())})


class LedgerWriter:
    """A ledger part written batch by batch (one Parquet row group per batch, keys in order: statistics let a
    key-range read skip the others), committed atomically when the block ends without error."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        self._atomic = atomic_path(self.path)
        tmp = self._atomic.__enter__()
        self._writer = pq.ParquetWriter(tmp, conform(accounting.make_ledger("download", [], [], []), "ledger").schema)
        return self

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self._writer.write_table(conform(table, "ledger"))

    def __exit__(self, *exc):
        self._writer.close()
        return self._atomic.__exit__(*exc)


class ImageNormalizer:
    """img2dataset 'resizer': bytes -> (jpeg, w, h, orig_w, orig_h, error) using our decoder, with the limits of
    the ``download`` settings."""

    def __init__(self, settings, images):
        self.settings, self.images = settings, images

    def __call__(self, img_stream, blurring_bbox_list=None):
        data = img_stream.read()
        dl = self.settings
        try:
            im, (ow, oh) = decode_image(data, self.images.max_image_pixels, dl.drop_animated,
                                        draft_size=self.images.max_side, orient=True)
            im = resize_max_side(im, self.images.max_side)
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
        if self.sink.get("abandoned"):  # an interrupted unit commits nothing
            self.tar.abort()
        else:
            self.tar.close()


def _interruptible(fn, on_interrupt):
    """`fn()` run in a daemon thread while this thread waits for it; on an interrupt (KeyboardInterrupt, or any
    exception raised here while waiting) call `on_interrupt()` (which makes `fn` end at once), give `fn` a few
    seconds to wind down (so it does not outlive the files it uses), and re-raise."""
    result: dict = {}
    done = threading.Event()  # not Thread.join: an interrupted join can leave the thread looking finished

    def target():
        try:
            result["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the waiting thread
            result["error"] = err
        finally:
            done.set()

    threading.Thread(target=target, name="lvd-download", daemon=True).start()
    try:
        while not done.wait(1.0):
            pass
    except BaseException:
        on_interrupt()
        with contextlib.suppress(BaseException):  # a second Ctrl-C stops waiting
            done.wait(10.0)
        raise
    if "error" in result:
        raise result["error"]
    return result["value"]


class DownloadStage(Stage):
    name = "download"
    section = "download"
    order = 10
    ledger = True
    drop_reasons = (
        "bad_url",  # malformed or unsupported URL (no scheme/host, not http/https)
        "duplicate_url",  # exact repeat of an earlier row's URL; the first occurrence is kept
        "blocked_domain",  # host (or a redirect target's host) is on the blocklist
        "private_address",  # host resolves to a private/loopback/link-local/metadata address not allowed by config
        "bad_redirect",  # a redirect to a non-http(s) URL (file:, ftp:, data:, gopher: ...)
        "redirect_loop",  # a redirect back to a URL already visited in the same chain
        "too_many_redirects",  # a redirect chain longer than the downloader follows
        "opted_out",  # X-Robots-Tag noai / noimageai
        "http_error",  # 4xx/5xx
        "timeout",  # connect or read timed out, or the per-URL deadline (download.deadline_s) passed
        "network_error",  # any other transport failure (DNS, reset...)
        "empty",  # zero bytes
        "too_large_file",  # more bytes than download.max_bytes
        "undecodable",  # not an image PIL can identify
        "truncated",  # an image whose data ends early
        "decompression_bomb",  # declared pixel count above the limit
        "animated",  # more than one frame
        "unsupported_mode",  # a pixel format we cannot convert to RGB
    )
    pool_tars = True

    # -- planning ----------------------------------------------------------------------------------------------
    def plan(self) -> list[Unit]:
        plan_file = self.layout.download_plan
        if not plan_file.exists():
            self._make_plan()
        plan = json.loads(plan_file.read_text())
        lost = [s for s, _ in plan["shards"] if not self.layout.download_input(s).exists()]
        if lost or not self.layout.ledger_part(self.name, "precheck").exists():
            # an input shard or the precheck drops were deleted: planning is deterministic, so redo it (never
            # shrink the accounting), and refuse if it no longer gives the same plan
            self._make_plan()
            again = json.loads(plan_file.read_text())
            if again != plan:
                raise RuntimeError(f"{plan_file}: re-planning the lost inputs gave a different plan (the URL lists "
                                   "changed since the run started); use a new run_root")
        return [Unit(s, {"rows": n}) for s, n in plan["shards"]]

    def _make_plan(self) -> None:
        """Number and precheck every input row, write the refused ones as ledger unit ``precheck``, cut the rest
        into input shards, then the plan (shards, their row counts and row ranges).

        The list streams through twice, a batch at a time: the first pass keeps an 8-byte hash of each URL, to
        find the hashes seen more than once; the second prechecks each batch, remembering only the URLs whose hash
        repeats (the repeat check of :func:`precheck` then sees every URL an earlier row holds), and writes each
        input shard when it is full.  Memory holds one batch, one shard and the hashes, whatever the list's size."""
        inputs = self.url_lists

        def batches():
            return iter_url_batches(inputs.url_list, inputs.url_col, inputs.caption_col)

        repeated = repeated_hashes(t["url"].to_pylist() for t in batches())
        policy = UrlPolicy.from_config(self.settings)
        size = self.settings.shard_size
        self.layout.download_inputs_dir.mkdir(parents=True, exist_ok=True)
        seen: dict[str, int] = {}
        shards, row_ranges, buffer, buffered = [], {}, [], 0
        n_rows = refused_rows = 0

        def flush(next_row: int | None) -> None:
            nonlocal buffer, buffered
            sid = f"{len(shards):05d}"
            part = pa.concat_tables(buffer) if buffer else _empty_input_shard()
            with atomic_path(self.layout.download_input(sid)) as tmp:
                with ipc.new_file(tmp, part.schema) as w:
                    w.write_table(part)
            lo = 0 if not shards else part["row_id"][0].as_py()
            shards.append((sid, part.num_rows))
            row_ranges[sid] = [lo, next_row]
            buffer, buffered = [], 0

        with LedgerWriter(self.layout.ledger_part(self.name, "precheck")) as ledger:
            for table in batches():
                row_ids, urls = table["row_id"].to_pylist(), table["url"].to_pylist()
                verdicts = precheck(row_ids, urls, table["url_error"].to_pylist(), policy, seen,
                                    lambda url: hash(url) in repeated)
                refused = [i for i, (reason, _) in enumerate(verdicts) if reason is not None]
                ledger.write(accounting.make_ledger(
                    "download", [make_key(row_ids[i]) for i in refused], [urls[i] for i in refused],
                    [verdicts[i][0] for i in refused], [verdicts[i][1] for i in refused]))
                refused_rows += len(refused)
                n_rows += table.num_rows
                keep = table.drop_columns(["url_error"]).filter(pa.array([r is None for r, _ in verdicts]))
                keep = keep.append_column("lvd_key", pa.array([make_key(r) for r in keep["row_id"].to_pylist()],
                                                              pa.string()))
                while keep.num_rows:
                    if buffered == size:  # a full shard ends where the next kept row starts
                        flush(keep["row_id"][0].as_py())
                    take = keep.slice(0, size - buffered)
                    keep = keep.slice(take.num_rows)
                    buffer.append(take)
                    buffered += take.num_rows
        # the last shard (at least one when there are rows at all: its status table lists the refused URLs)
        if buffered or n_rows:
            flush(n_rows)
        write_json(self.layout.download_plan, {"shards": shards, "rows": n_rows,
                                               "refused_before_fetch": refused_rows, "row_ranges": row_ranges})

    def _refused_status_rows(self, unit: Unit) -> list[dict]:
        """Status rows for the URLs of this shard's row range that were refused before any fetch."""
        lo, hi = json.loads(self.layout.download_plan.read_text())["row_ranges"][unit.id]
        ledger = pq.read_table(  # keys are sorted: row-group statistics skip the other shards' rows
            self.layout.ledger_part(self.name, "precheck"),
            filters=(pc.field("key") >= make_key(lo)) & (pc.field("key") < make_key(hi)),
        )
        return [
            {"key": r["key"], "row_id": int(r["key"]), "url": r["url"], "caption": None, "status": "dropped",
             "reason": r["reason"], "error_message": r["detail"], "width": None, "height": None,
             "original_width": None, "original_height": None, "sha256": None}
            for r in ledger.to_pylist()
        ]

    # -- one shard ---------------------------------------------------------------------------------------------
    def run_unit(self, unit: Unit) -> dict:
        from curation.pipeline.retry import keys_to_retry

        dl = self.settings
        retry = keys_to_retry(self.root, unit.id)
        policy = UrlPolicy.from_config(dl)
        with safe_urlopen(policy, dl.use_env_proxy, dl.max_bytes, dl.deadline_s or 3 * dl.timeout_s):
            rows = self._refetch(unit, retry, policy) if retry else self._fetch(unit, policy)
        if len(rows) != unit.payload["rows"]:
            raise RuntimeError(f"shard {unit.id}: {len(rows)} status rows for {unit.payload['rows']} URLs")
        status = sorted(rows + self._refused_status_rows(unit), key=lambda r: r["row_id"])
        write_table(self.layout.download_status(unit.id), pa.Table.from_pylist(status), "download_status")
        ledger = accounting.make_ledger(
            "download", [r["key"] for r in rows], [r["url"] for r in rows], [r["reason"] for r in rows],
            [r["error_message"] if r["reason"] else None for r in rows],
        )
        accounting.write_ledger(self.root, self.name, unit.id, ledger)
        n_ok = sum(r["status"] == "success" for r in rows)
        return {"ok": n_ok, "failed": len(rows) - n_ok}

    def _refetch(self, unit: Unit, keys: set[str], policy: UrlPolicy) -> list[dict]:
        """Fetch only the rows `keys` of a finished shard again (a retry of transient failures) and merge them into
        the shard: the other rows keep their images and status rows; the shard's tar is rewritten in key order.
        Reruns give the same shard (the merge takes the other rows from the shard, never from an earlier merge's
        fetches), so a retry killed at any point is simply run again."""
        scratch = self.layout.stage_dir(self.name) / "_retry"
        scratch.mkdir(parents=True, exist_ok=True)
        shard_rows = ipc.open_file(self.layout.download_input(unit.id)).read_all()
        todo = shard_rows.filter(pc.is_in(shard_rows["lvd_key"], value_set=pa.array(sorted(keys), pa.string())))
        subset = scratch / f"{unit.id}.arrow"
        with atomic_path(subset, record=False) as tmp:
            with ipc.new_file(tmp, todo.schema) as w:
                w.write_table(todo)
        fetched = {r["key"]: r for r in self._fetch(unit, policy, subset, scratch / f"{unit.id}.tar")}
        own = set(shard_rows["lvd_key"].to_pylist())
        old = pq.read_table(self.layout.download_status(unit.id)).to_pylist()
        rows = [fetched.get(r["key"], r) for r in old if r["key"] in own]
        new_images = dict(iter_tar_samples(scratch / f"{unit.id}.tar"))
        images = {k: m for k, m in iter_tar_samples(self.layout.download_tar(unit.id)) if k not in keys}
        images.update(new_images)
        with TarShardWriter(self.layout.download_tar(unit.id)) as tar:
            for key in sorted(images):
                tar.write(key, images[key])
        return rows

    def _fetch(self, unit: Unit, policy: UrlPolicy, rows_file=None, tar=None) -> list[dict]:
        """Fetch the shard's URLs (those of `rows_file`, default the shard's input) with img2dataset's downloader
        into ``download/<shard>.tar`` (or `tar`); return its status rows, sorted by row id.

        The downloader runs in a helper thread while this one waits: an interrupt (Ctrl-C) reaches this thread
        at once, abandons the fetches in flight (``policy.abandon()`` shuts their connections) and leaves the unit
        unfinished, its tar uncommitted, instead of waiting in img2dataset's thread pool for every open request,
        and of recording the interrupted fetches as failures: a rerun fetches them again."""
        dl = self.settings
        sink = {"tar": tar or self.layout.download_tar(unit.id), "rows": []}
        downloader = img2dataset_downloader()(
            sample_writer_class=partial(_ShardWriter, sink=sink),
            resizer=ImageNormalizer(dl, self.images),
            thread_count=dl.threads,
            save_caption=True,
            extract_exif=False,
            output_folder=str(self.dir),
            column_list=["url", "caption", "lvd_key", "row_id"],
            timeout=dl.timeout_s,
            number_sample_per_shard=max(dl.shard_size, 10),
            oom_shard_count=5,
            compute_hash="sha256",
            verify_hash_type=None,
            encode_format="jpg",
            retries=dl.retries,
            user_agent_token=dl.user_agent_token,
            disallowed_header_directives=dl.disallowed_header_directives,
        )
        # img2dataset deletes the shard file it was given: hand it a temporary link, so the input outlives the
        # unit's completion marker (a unit killed after that delete, or whose ledger is removed, can be redone).
        with temporary_link(rows_file or self.layout.download_input(unit.id)) as consumable:
            ok = _interruptible(lambda: downloader((int(unit.id), str(consumable)))[0],
                                on_interrupt=lambda: (sink.__setitem__("abandoned", True), policy.abandon()))
        if not ok:
            raise RuntimeError(f"img2dataset failed on shard {unit.id} (traceback above)")
        return sorted(sink["rows"], key=lambda r: r["row_id"])
