"""tideserve decode_worker service (see DESIGN.md)."""
