"""stream: see DESIGN.md."""
