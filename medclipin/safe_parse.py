"""YAML and JSON from files anyone may have written (configs, prompt files, model folders, manifests).

``yaml.safe_load`` never builds Python objects, but it expands aliases: nine anchors of nine aliases each
("billion laughs") nested under any key grow a few hundred bytes into gigabytes. And both parsers recurse
once per nesting level, so a document nested 200,000 deep ends in a ``RecursionError``. The two loaders
here refuse both, with the error type the callers already turn into one-line messages:

* :func:`load_yaml`: safe tags only, no aliases, at most :data:`MAX_DEPTH` levels; raises ``yaml.YAMLError``.
* :func:`load_json`: at most :data:`MAX_DEPTH` levels; raises ``ValueError`` (as ``json.loads`` does).
"""

from __future__ import annotations

import json

import yaml

# no configuration, prompt file, model config or tokenizer nests anywhere near this deep
MAX_DEPTH = 100


class _BoundedSafeLoader(yaml.SafeLoader):
    """yaml's safe loader without aliases and with a nesting bound (checked while composing, before any
    expansion or construction)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"aliases (*{event.anchor}) are not allowed in medclipin files", event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def load_yaml(text):
    """Like ``yaml.safe_load`` (a string or a stream), refusing aliases and nesting deeper than
    :data:`MAX_DEPTH` with a ``yaml.YAMLError`` that names the line."""
    loader = _BoundedSafeLoader(text)
    try:
        return loader.get_single_data()
    except RecursionError:
        raise yaml.YAMLError(f"nested deeper than {MAX_DEPTH} levels") from None
    finally:
        loader.dispose()


def load_json(text: str | bytes):
    """Like ``json.loads``, refusing nesting deeper than :data:`MAX_DEPTH` with a ``ValueError``."""
    value = _parse_json(text)
    if _depth(value) > MAX_DEPTH:
        raise ValueError(f"JSON nested deeper than {MAX_DEPTH} levels")
    return value


def _parse_json(text):
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"JSON nested deeper than {MAX_DEPTH} levels") from None


def _depth(value, limit: int = MAX_DEPTH + 1) -> int:
    """Nesting depth of a parsed value, counted without recursion and only up to ``limit``."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, (dict, list)):
            continue
        deepest = max(deepest, depth)
        if deepest >= limit:
            return deepest
        stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest
