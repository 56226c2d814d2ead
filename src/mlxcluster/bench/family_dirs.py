"""The model-family fixtures the issue-19 benchmarks run on, found in a directory built beforehand.

The fixtures are built by the test suite's ``tests/families.py`` (tiny offline model dirs of Qwen3, Gemma 3,
Qwen3-Next, Mistral, Llama 3, and the demo weights behind the Qwen3 template); they stay in ``tests/``, so a
benchmark takes the directory they were built into (``--families-dir``) and says how to build it when it lacks
them. ``make bench`` builds them first.
"""

from __future__ import annotations

from pathlib import Path

RANDOM_FAMILIES = ("qwen3", "gemma3", "qwen3_next", "mistral", "llama3")
"""The random-weight fixtures: fast, gibberish, never ending on their own."""
DEMO_FAMILY = "qwen3_demo"
"""The demo model's real weights behind the Qwen3 template: a realistic step time, and it renders tools."""
THINKING = frozenset({"qwen3", "qwen3_next", "qwen3_demo"})
"""Fixtures whose template has a thinking switch (``enable_thinking``)."""
BUILD_HINT = "python tests/families.py DIR (make bench does this), then pass --families-dir DIR"


class MissingFamilies(Exception):
    """Fixtures a benchmark needs are not built; the message says which and how to build them."""


def family_dirs(root: Path | None, names: tuple[str, ...]) -> dict[str, Path]:
    """The model dir of each of ``names`` under ``root``; raises :class:`MissingFamilies` when one is absent."""
    if root is None:
        raise MissingFamilies(f"not run: needs the family fixtures ({', '.join(names)}); build them with {BUILD_HINT}")
    missing = [name for name in names if not (root / name / "config.json").is_file()]
    if missing:
        raise MissingFamilies(
            f"not run: {', '.join(missing)} not built under {root}; build them with "
            f"python tests/families.py {root} {' '.join(missing)}"
        )
    return {name: root / name for name in names}
