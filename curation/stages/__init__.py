"""The stage registry: every stage class, and what the rest of lvd derives from their declarations.

A stage declares its place and role once, on its class (:class:`curation.stages.base.Stage`: ``name``, ``order``,
``section``, ``ledger``, ``drop_reasons``, ``pool_tars``, ``per_shard``); the pipeline order, the ledger stages, the
stages whose tars hold the pool, the drop-reason vocabulary and the config's stage names are read from here.

The built-in stages are :data:`BUILTIN`.  Another stage joins with :func:`register_stage` (a class, or a
``"package.module:Class"`` path), or by naming its ``package.module:Class`` in the config's ``stages`` list; its
``order`` places it in the chain (an aesthetic filter between filter (20) and hash (30) declares 25) and the stages
after it receive its kept keys without any change.  Stage modules are imported when first asked for; a Ray worker
builds its stage from the class path, so a registered stage runs there too.
"""

from __future__ import annotations

import importlib

#: the built-in stages (``package.module:Class``); their order in the chain is each class's ``order``
BUILTIN = (
    "curation.stages.download:DownloadStage",
    "curation.stages.filter:FilterStage",
    "curation.stages.hash:HashStage",
    "curation.stages.sscd:SSCDStage",
    "curation.stages.dedup:DedupStage",
    "curation.stages.embed:EmbedStage",
    "curation.stages.retrieve:RetrieveStage",
    "curation.stages.shards:ShardsStage",
    "curation.stages.report:ReportStage",
)

_registered: dict[str, type] = {}  # name -> class, in registration order


def class_path(cls: type) -> str:
    """``package.module:Class`` of a stage class (what a worker imports to build it)."""
    return f"{cls.__module__}:{cls.__qualname__}"


def load_class(path: str) -> type:
    """The class a ``package.module:Class`` path names (a ValueError with one line when it names none)."""
    module_name, _, cls_name = path.partition(":")
    try:
        return getattr(importlib.import_module(module_name), cls_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            raise ValueError(f"stage class {path!r}: no module {err.name!r}") from None
        raise
    except AttributeError:
        raise ValueError(f"stage class {path!r}: module {module_name!r} defines no {cls_name!r}") from None


def register_stage(stage: type | str) -> type:
    """Add a stage class (or its ``package.module:Class`` path) to the registry and return the class; registering
    the same class again is a no-op.  Its name and order must be new: two stages at one place would make the chain
    ambiguous."""
    cls = load_class(stage) if isinstance(stage, str) else stage
    _builtins()
    for field in ("name", "order"):
        if not hasattr(cls, field):
            raise ValueError(f"stage class {class_path(cls)} declares no {field!r}")
    other = _registered.get(cls.name)
    if other is not None and other is not cls:
        raise ValueError(f"stage name {cls.name!r} is taken by {class_path(other)}")
    for o in _registered.values():
        if o is not cls and o.order == cls.order:
            raise ValueError(f"stage {cls.name!r}: order {cls.order} is taken by stage {o.name!r}")
    if cls.drop_reasons and not cls.ledger:
        raise ValueError(f"stage {cls.name!r} declares drop reasons but writes no ledger")
    from curation.config import CurateConfig

    if cls.section is not None and cls.section not in CurateConfig.model_fields:
        raise ValueError(f"stage {cls.name!r}: config section {cls.section!r} does not exist")
    _registered[cls.name] = cls
    return cls


def _builtins() -> None:
    if not _registered:
        for path in BUILTIN:
            cls = load_class(path)
            _registered[cls.name] = cls


def stage_classes() -> list[type]:
    """Every registered stage class, in pipeline order."""
    _builtins()
    return sorted(_registered.values(), key=lambda c: c.order)


def stage_order() -> tuple[str, ...]:
    """Every stage name, in pipeline order."""
    return tuple(c.name for c in stage_classes())


def ledger_stages() -> tuple[str, ...]:
    """The stages that write a ledger (a verdict per key they received), in order."""
    return tuple(c.name for c in stage_classes() if c.ledger)


def pool_tar_stages() -> tuple[str, ...]:
    """The stages whose tar shards hold the pool images they keep, in order (a later one supersedes an earlier)."""
    return tuple(c.name for c in stage_classes() if c.pool_tars)


def per_shard_stages() -> tuple[str, ...]:
    """The stages whose units are the pool shards (redone per shard when a download shard changes)."""
    return tuple(c.name for c in stage_classes() if c.per_shard)


def drop_reasons(stage: str) -> tuple[str, ...]:
    """The closed vocabulary of reasons `stage` may drop a key for (the ``detail`` column carries specifics)."""
    return stage_class(stage).drop_reasons


def stage_class(name: str) -> type:
    """The class of stage `name`, or of the ``package.module:Class`` it names (registering it)."""
    if ":" in name:
        return register_stage(name)
    _builtins()
    try:
        return _registered[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; known: {', '.join(stage_order())}") from None


def stage_name(entry: str) -> str:
    """A config ``stages`` entry as a stage name: a name is checked, a ``package.module:Class`` is registered."""
    return stage_class(entry).name
