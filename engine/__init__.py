"""lightloop.engine: see DESIGN.md (built in a later issue)."""

__all__: list[str] = []
