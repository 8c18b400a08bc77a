"""tideserve router service (see DESIGN.md)."""
