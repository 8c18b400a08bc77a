"""tideserve autoscaler service (see DESIGN.md)."""
