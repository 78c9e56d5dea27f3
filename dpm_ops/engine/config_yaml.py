"""Reading a config's YAML: files and ``key=value`` override values, with PyYAML's safe loader and what it lets
through refused: a key written twice in one mapping, a document of more than MAX_YAML_VALUES values (aliases
counted at each use), YAML 1.1's octal (``0123``) and base-60 (``1:30``) numbers, and in an override a comment
(`` #``) that cuts the value short."""

from __future__ import annotations

import re
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import yaml

from .config_checks import ConfigError, quote

# The most values one YAML document may hold, aliases counted at each use: a config has a few hundred, and a
# 363-byte override nesting aliases eight deep held 10^8 (YAML's "billion laughs")
MAX_YAML_VALUES = 100_000
# YAML 1.1 integers and floats that read as another number than they seem to spell: 0123 is octal 83, 1:30 is
# base 60 (90; a time or a ratio was meant); YAML 1.2 reads neither so
_OCTAL = re.compile(r"[-+]?0[0-7_]+$")
_BASE_60 = re.compile(r"[-+]?[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?$")


class _TooLarge(yaml.composer.ComposerError):
    """A YAML document holds more than MAX_YAML_VALUES values."""


class _OtherNumber(yaml.constructor.ConstructorError):
    """A YAML 1.1 octal or base-60 number."""


class _Loader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping (YAML keeps the last one silently:
    a second `solver:` section dropped the first; a key a merge `<<: *base` brings is no repeat, the
    mapping's own one wins, as YAML says), a document of more than MAX_YAML_VALUES values and YAML 1.1's octal
    and base-60 numbers."""

    def __init__(self, stream):
        super().__init__(stream)
        self.sizes = {}  # node -> the values it holds, itself included, aliases counted at each use
        self.flattened = set()  # mappings whose merges are done and own keys checked

    def compose_node(self, parent, index):
        alias = self.check_event(yaml.AliasEvent)
        node = super().compose_node(parent, index)
        if not alias:  # an alias's node was counted where it was written
            if isinstance(node, yaml.MappingNode):
                children = [child for pair in node.value for child in pair]
            else:
                children = node.value if isinstance(node, yaml.SequenceNode) else ()
            # a node still being composed (a recursive value, &a [*a]) counts once
            size = 1 + sum(self.sizes.get(child, 1) for child in children)
            if size > MAX_YAML_VALUES:
                problem = f"more than {MAX_YAML_VALUES} values (YAML aliases count at each use)"
                raise _TooLarge(None, None, problem, node.start_mark)
            self.sizes[node] = size
        return node

    def flatten_mapping(self, node):
        if node in self.flattened:  # merged in a second time: its merge keys are gone, its keys all its own
            return
        self.flattened.add(node)
        own = [key_node for key_node, _ in node.value if key_node.tag != "tag:yaml.org,2002:merge"]
        super().flatten_mapping(node)  # the merged pairs go first: the mapping's own ones, last, win
        seen = set()
        for key_node in own:
            key = self.construct_object(key_node)
            if not isinstance(key, Hashable):
                continue  # SafeLoader refuses it
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {quote(key)} is written twice in one mapping", key_node.start_mark
                )
            seen.add(key)

    def construct_yaml_int(self, node):
        self._refuse_other_readings(node)
        return super().construct_yaml_int(node)

    def construct_yaml_float(self, node):
        self._refuse_other_readings(node)
        return super().construct_yaml_float(node)

    @staticmethod
    def _refuse_other_readings(node) -> None:
        text = node.value.strip()
        reading = "octal" if _OCTAL.match(text) else "base-60" if _BASE_60.match(text) else None
        if reading is not None:
            raise _OtherNumber(
                None,
                None,
                f"{text} is a YAML 1.1 {reading} number (not the decimal it seems to spell); write the number "
                f"itself, or quote it for a string",
                node.start_mark,
            )


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _Loader.construct_yaml_float)


def load_yaml(stream):
    try:
        return yaml.load(stream, Loader=_Loader)
    except RecursionError:
        raise yaml.YAMLError("nested too deeply") from None
    except UnicodeDecodeError:
        raise  # the file's, reported as such
    except ValueError as error:  # a constructor's: an integer of more than 4300 digits, a day past its month
        raise yaml.YAMLError(str(error)) from None


def read_yaml(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            data = load_yaml(handle)
    except OSError as error:
        raise ConfigError(f"cannot read config {path}: {error.strerror or error}") from error
    except UnicodeDecodeError as error:
        raise ConfigError(f"config {path} is not UTF-8 text: {error.reason} at byte {error.start}") from error
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"invalid YAML in {path}{where}: {getattr(error, 'problem', error)}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of sections, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` as (key, the value's YAML reading); a value that is not YAML is the text itself."""
    if not isinstance(text, str):
        raise ConfigError(f"override {quote(text)} is not a key=value string")
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {quote(text)} is not key=value")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except _TooLarge as error:
        raise ConfigError(f"override {quote(text)}: its value holds {error.problem}") from None
    except _OtherNumber as error:
        raise ConfigError(f"override {quote(text)}: {error.problem}") from None
    except yaml.YAMLError:
        return key.strip(), raw
    if _read_up_to(raw) < len(raw.rstrip()):  # dataset.root=/data/set #2 read /data/set
        raise ConfigError(
            f"override {quote(text)}: ' #' starts a YAML comment, which cuts the value to {quote(value)}; quote "
            "the value (key='\"a #b\"') or leave the comment out"
        )
    return key.strip(), value


def _read_up_to(raw: str) -> int:
    """Where YAML's last token of ``raw`` ends: before its length (less trailing spaces) where a comment ends it."""
    ends = (token.end_mark.index for token in yaml.scan(raw) if not isinstance(token, yaml.StreamEndToken))
    return max(ends, default=0)
