"""``--label-map FILE``: which values of a categorical label column mean which class.

The file is YAML, class → list of source values (a single string is a list of one)::

    COVID-19: ["COVID-19", "COVID-19, ARDS"]
    No Finding: ["No finding", "normal"]

Values match case- and whitespace-insensitively ("No  Finding" = "no finding"). A value listed under two
classes is positive for both. A value listed nowhere is, by the adapter's switch, negative for every
class (the question "is it COVID-19?" answered no) or not stated (the row says nothing about any class).
Shipped examples: ``datasets/chexpert/label_map.yaml``, ``datasets/figure1/label_map.yaml``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from medclipin.data.prepare.common import PrepareError

UNLISTED = ("negative", "not-stated")


def normalise(value: str) -> str:
    return " ".join(str(value).split()).casefold()


@dataclass
class LabelMap:
    """Class names in file order and the normalised source value → classes lookup."""

    path: str
    classes: list[str]
    lookup: dict[str, frozenset[str]]

    def classes_of(self, value: str) -> frozenset[str] | None:
        """The classes ``value`` is positive for; ``None`` when the map does not list it."""
        return self.lookup.get(normalise(value))


def load_label_map(path: str | os.PathLike) -> LabelMap:
    """Read and check a label map; errors name the file and the class."""
    path = Path(path)
    if not path.is_file():
        raise PrepareError(f"{path}: label map not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise PrepareError(f"{path}: not valid YAML for a label map ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or not data:
        raise PrepareError(f"{path}: a label map is a non-empty mapping of class -> list of source values")
    lookup: dict[str, set[str]] = {}
    for name, values in data.items():
        values = [values] if isinstance(values, (str, int, float)) else values
        if not isinstance(values, list) or not values or not all(isinstance(v, (str, int, float)) for v in values):
            raise PrepareError(f"{path}: class {name!r} needs a non-empty list of source values")
        for value in values:
            if not normalise(value):
                raise PrepareError(f"{path}: class {name!r} lists an empty value")
            lookup.setdefault(normalise(value), set()).add(str(name))
    return LabelMap(str(path), [str(n) for n in data], {k: frozenset(v) for k, v in lookup.items()})
