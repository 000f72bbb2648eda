"""`curate.py --check`: what a valid config would still do wrong, said before any work starts.

The config schema refuses impossible values; these are possible but almost certainly not meant: models that would
run with random weights, and URLs on loopback/private addresses that the download refuses unless
``download.allow_networks`` lets them through.  (URL files that cannot be read or lack the URL column are errors:
:func:`curation.data.urllists.check_url_lists`.)
"""

from __future__ import annotations

from urllib.parse import urlsplit

from curation.config import ConfigError, CurateConfig
from curation.data.urllists import check_url_lists

#: URLs read for the private-address check (the check is a hint, not a scan of a billion-row list)
URL_SAMPLE = 100_000


def _private_urls(cfg: CurateConfig) -> tuple[int, list[str]]:
    """(how many sampled URLs point at loopback/private hosts the policy refuses, a few examples)."""
    from itertools import islice

    from curation.data.urllists import iter_url_batches
    from curation.rules.urlsafety import Refused, UrlPolicy

    policy = UrlPolicy.from_config(cfg.download)
    batches = iter_url_batches(cfg.input.url_list, cfg.input.url_col, None)
    try:
        urls = list(islice((u for t in batches for u in t["url"].to_pylist()), URL_SAMPLE))
    except ConfigError:  # a malformed row beyond what check_url_lists parsed: the run reports it, in one line
        return 0, []
    hits = []
    for url in urls:
        try:
            policy.check_url(url)
            host = (urlsplit(url).hostname or "").lower().rstrip(".")
            if host == "localhost" or host.endswith(".localhost"):
                hits.append(url)
        except Refused as err:
            if err.reason == "private_address":
                hits.append(url)
        except Exception:  # noqa: BLE001 - malformed URLs are the download's business (bad_url drops)
            pass
    return len(hits), hits[:3]


def preflight_warnings(cfg: CurateConfig) -> list[str]:
    """One line per likely mistake in a valid config (empty when none)."""
    out = []
    stages = set(cfg.stages)
    if "dedup" in stages and cfg.sscd.descriptor == "sscd" and cfg.sscd.weights is None:
        out.append("sscd.weights is null: copy detection would run SSCD with random weights and find no real "
                   "copies (give the official sscd_disc_mixup file, or sscd.descriptor: pixels for tests)")
    if "embed" in stages and cfg.embed.model != "pixels" and cfg.embed.checkpoint is None:
        out.append(f"embed.checkpoint is null: the embedder {cfg.embed.model!r} would run with random weights and "
                   "retrieval would select at chance (give local weights in embed.checkpoint)")
    # (unreadable URL files and a missing url column are errors of their own, reported by check_url_lists)
    if "download" in stages and not cfg.download.allow_networks and not check_url_lists(cfg.input):
        n, examples = _private_urls(cfg)
        if n:
            out.append(f"{n} URLs point at loopback/private addresses (e.g. {', '.join(examples)}) and "
                       "download.allow_networks is empty: every one would be dropped as private_address (allow "
                       "e.g. 127.0.0.1/32 for a local server)")
    return out
