"""The curation stages, by name (imported lazily: a stage's heavy dependencies load only when it runs)."""

from __future__ import annotations

import importlib

STAGE_CLASSES = {
    "download": "curation.stages.download:DownloadStage",
    "filter": "curation.stages.filter:FilterStage",
    "hash": "curation.stages.hash:HashStage",
    "sscd": "curation.stages.sscd:SSCDStage",
    "dedup": "curation.stages.dedup:DedupStage",
    "embed": "curation.stages.embed:EmbedStage",
    "retrieve": "curation.stages.retrieve:RetrieveStage",
    "shards": "curation.stages.shards:ShardsStage",
    "report": "curation.stages.report:ReportStage",
}


def stage_class(name: str):
    try:
        module_name, cls_name = STAGE_CLASSES[name].split(":")
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; known: {', '.join(STAGE_CLASSES)}") from None
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            raise NotImplementedError(f"stage {name!r} is not available in this version of lvd") from None
        raise
    return getattr(module, cls_name)
