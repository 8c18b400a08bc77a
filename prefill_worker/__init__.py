"""tideserve prefill_worker service (see DESIGN.md)."""
