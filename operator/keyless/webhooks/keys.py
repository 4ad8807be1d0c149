"""Object keys read the way Argo CD's Go code decodes them (encoding/json), for the guardrails (pure).

Go's decoder matches a JSON key to a struct field without regard to case: an ASCII letter folds to
upper case, any other rune r to unicode.ToUpper(unicode.ToLower(r)). So `Spec` is `spec`, and so are
`ſpec` (U+017F, long s) and `Kind` with a Kelvin sign (U+212A). Argo CD decodes templatePatch and the
raw JSON of nested matrix/merge generators that way, after the API server stored them untouched. The
guardrails therefore read every struct key by its folded name, and refuse an object in which two
keys fold alike (`server` and `Server`): which of them Go keeps is not something to bet a tenant
boundary on. Keys of map-typed fields (labels, list elements, values) stay exact, as Go keeps them.
"""
from __future__ import annotations

from typing import Any, Mapping

import yaml

# Lower-case forms Python spells with several characters where Go's simple mapping has one.
_SIMPLE_LOWER = {"\u0130": "i"}  # İ -> i (Python: i + combining dot)

# The Argo CD field names the guardrails read, in their canonical spelling.
FIELD_NAMES = (
    "apiVersion", "kind", "metadata", "name", "namespace", "labels", "annotations", "finalizers",
    "spec", "project", "destination", "server", "source", "sources", "syncPolicy",
    "template", "templatePatch", "goTemplate", "goTemplateOptions", "generators", "selector",
    "matchLabels", "matchExpressions", "key", "operator", "values",
    "list", "elements", "elementsYaml", "clusters", "git", "files", "directories", "path", "exclude",
    "matrix", "merge", "mergeKeys", "scmProvider", "clusterDecisionResource", "pullRequest", "plugin",
    "repoURL", "revision", "targetRevision", "requeueAfterSeconds", "configMapRef", "labelSelector",
    "strategy", "preservedFields", "ignoreApplicationDifferences", "applyNestedSelectors",
)
# Fields whose value is a Go map (or a list of maps): their keys are data, compared exactly.
MAP_FIELDS = frozenset({"labels", "annotations", "matchLabels", "values", "valuesObject", "parameters",
                        "commonLabels", "commonAnnotations", "elements", "options", "map"})


def fold_rune(ch: str) -> str:
    if ch < "\x80":
        return ch.upper()
    lower = ch.lower()
    if len(lower) != 1:
        lower = _SIMPLE_LOWER.get(ch, ch)
    upper = lower.upper()
    return upper if len(upper) == 1 else lower  # Go's simple mapping never grows a rune into several


def fold(key: str) -> str:
    """The form two keys share exactly when Go's encoding/json would match them to the same field."""
    return "".join(fold_rune(ch) for ch in key)


_CANONICAL = {fold(name): name for name in FIELD_NAMES}


class AmbiguousKeys(ValueError):
    """Two keys of one object fold to the same field name."""

    def __init__(self, path: str, first: str, second: str):
        where = path or "the object"
        super().__init__(f"{where} has both {first!r} and {second!r}, which Argo CD reads as the same field; "
                         f"keep one key, spelled exactly as the field (e.g. {_CANONICAL.get(fold(first), first)!r})")


def canonical(value: Any, path: str = "") -> Any:
    """A copy of a decoded JSON/YAML value whose struct keys are spelled as the guardrails read them.

    Raises AmbiguousKeys when two keys of one object fold alike.
    """
    if isinstance(value, Mapping):
        out: dict = {}
        seen: dict[str, str] = {}
        for raw_key, child in value.items():
            key = str(raw_key)
            folded = fold(key)
            if folded in seen:
                raise AmbiguousKeys(path, seen[folded], key)
            seen[folded] = key
            name = _CANONICAL.get(folded, key)
            where = f"{path}.{name}" if path else name
            out[name] = child if name in MAP_FIELDS else canonical(child, where)
        return out
    if isinstance(value, list):
        return [canonical(item, f"{path}[{index}]") for index, item in enumerate(value)]
    return value


class DuplicateKey(ValueError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """YAML (and JSON) with duplicate keys refused instead of silently keeping the last one."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)  # YAML merge keys (<<) first; explicit keys may override them
    seen: set = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:  # an unhashable key: construct_mapping refuses it below
            continue
        if duplicate:
            raise DuplicateKey(f"key {key!r} appears twice")
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def load_strict(text: str) -> Any:
    """Parses YAML or JSON; raises DuplicateKey or yaml.YAMLError."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)

