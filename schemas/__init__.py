"""Arrow schemas of every table lvd writes (see :mod:`schemas.tables`)."""

from schemas.tables import (  # noqa: F401
    SCHEMAS,
    SchemaError,
    conform,
    empty,
    validate,
)
