"""The Hub's license identifiers (builder/data/hub_licenses.txt, from the Hub's documentation, `LICENSES_URL`): the
only values the Hub accepts as a card's `license`. The recipe schema checks `publish.license` against them, `plan` and
`validate` the license a card would inherit from a local source's README.md (`builder.card`), and the local registry
refuses a card that names another, as the Hub does."""

from __future__ import annotations

from functools import cache
from importlib import resources

from builder.recipe.wording import closest, show

LICENSES_URL = "https://huggingface.co/docs/hub/repositories-licenses"


@cache
def hub_licenses() -> tuple[str, ...]:
    text = resources.files("builder").joinpath("data/hub_licenses.txt").read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))


def license_problem(value: object) -> str | None:
    """Why `value` is not a Hub license identifier (with the nearest one), or None when it is one."""
    choices = hub_licenses()
    if isinstance(value, str) and value in choices:
        return None
    # 'Apache 2.0' and 'MIT' are how people write them; the Hub wants 'apache-2.0' and 'mit'.
    normalized = "-".join(value.lower().replace("license", "").split()) if isinstance(value, str) else ""
    found = normalized if normalized in choices else closest(normalized, choices) if normalized else None
    hint = f" (did you mean {found!r}?)" if found else ""
    return (
        f"{show(value)} is not a Hub license identifier{hint}; write one of those listed at {LICENSES_URL}, "
        "or `other` and name the license in the card's text"
    )


def card_license_problems(value: object) -> list[str]:
    """What the Hub refuses in a card's `license` (one identifier, or a list of them): `license_problem` of each."""
    return [problem for item in (value if isinstance(value, list) else [value]) if (problem := license_problem(item))]
