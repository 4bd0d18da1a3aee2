"""The eight semantic places of the paper (section 3.4), in a fixed index order."""

DEFAULT_LABELS: tuple[str, ...] = (
    "home", "work", "school", "restaurant", "cinema", "gym", "shopping", "travel",
)
