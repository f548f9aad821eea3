"""Label sources -> label store (issue 3). See docs/label_store.md."""
from pllcli.labels.store import (  # noqa: F401
    FORMAT, FORMAT_VERSION, LabelData, LabelStore, align_ids, describe, merge_label_data,
    merge_label_stores, read_label_store, write_label_store,
)
