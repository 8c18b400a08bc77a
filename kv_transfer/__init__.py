"""tideserve kv_transfer service (see DESIGN.md)."""
