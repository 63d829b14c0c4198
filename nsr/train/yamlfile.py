"""YAML files the project reads (run configs, NNI experiment configs): yaml.safe_load, except that
a key given twice is an error, and a file that cannot be read as a mapping is one UserError line."""

from __future__ import annotations

import os
from typing import Any

import yaml

from .errors import UserError


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error: PyYAML would
    keep the last value and drop the first without a word."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base`: its keys merge in below (construct_mapping), later keys win
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: construct_mapping's own error says so
                continue
            if first is not key_node:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (first at line {first.start_mark.line + 1}); "
                    "keep one", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def safe_load_unique(stream) -> Any:
    """yaml.safe_load that refuses duplicate keys (a yaml.YAMLError naming the key and its lines)."""
    return yaml.load(stream, Loader=_UniqueKeyLoader)  # safe: a SafeLoader subclass


def load_yaml(path: str) -> dict[str, Any]:
    if os.path.isdir(path):
        raise UserError(f"config file {path!r} is a folder; pass a YAML file to --config")
    if not os.path.isfile(path):
        raise UserError(f"config file {path!r} not found; pass an existing YAML file to --config")
    try:
        with open(path) as f:
            data = safe_load_unique(f)
    except UnicodeDecodeError:
        raise UserError(f"config file {path!r} is not a text YAML file; pass a YAML file to --config") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise UserError(f"config file {path!r} is not valid YAML{line}: "
                        f"{getattr(e, 'problem', None) or e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path!r} must hold a mapping of keys to values, "
                        f"got {type(data).__name__}")
    return data
