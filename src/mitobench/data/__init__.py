"""Datasets as one record table, the decoded patch cache, download and integrity checks."""

from mitobench.data.records import (  # noqa: F401
    HOLDOUT_SETS,
    RECORD_COLUMNS,
    discover,
    load_amibr,
    load_atnorm_br,
    load_atnorm_md,
    load_custom,
    resolve_data_root,
)
