"""Arrow schemas of every table lvd writes (see :mod:`schemas.tables`)."""

from schemas.tables import (  # noqa: F401
    ALL_DROP_REASONS,
    DROP_REASONS,
    SCHEMAS,
    SchemaError,
    conform,
    empty,
    validate,
)
