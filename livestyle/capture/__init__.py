"""capture: see DESIGN.md."""
