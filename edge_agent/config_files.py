"""One way to read a YAML config file, for the agent and the trainer service alike.

``${ENV}`` and ``${ENV:-default}`` are substituted in the parsed scalars (keys and values, never in
comments, and a variable cannot add structure), relative paths are resolved against the file's directory, and every problem is one :class:`ConfigError` line naming the file, the field
and what is wrong, e.g. ``agent.yaml: mqtt.url: must start with mqtt:// or mqtts:// (got 'tcp://x')``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from edge_agent.errors import ConfigError

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """The base of every config section: an unknown key is an error, so a typo is never ignored."""

    model_config = ConfigDict(extra="forbid")


def substitute_env(text: str, origin: str) -> str:
    """Replace ``${NAME}`` / ``${NAME:-default}``; an unset variable without a default is an error."""

    def repl(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigError(f"{origin}: environment variable ${{{name}}} is not set and has no default")

    return _ENV.sub(repl, text)


def read_yaml(path: str | Path) -> Any:
    """Read a YAML file with ``${ENV}`` substituted; a missing file or bad YAML is one ConfigError line."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{p}: not UTF-8 text (byte {exc.start}: {exc.object[exc.start : exc.start + 1]!r})"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read ({exc.strerror})") from None
    try:
        return _load_substituted(text, str(p))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{p}:{where} invalid YAML: {getattr(exc, 'problem', exc)}") from None


def _load_substituted(text: str, origin: str) -> Any:
    """Parse YAML, substitute ``${ENV}`` in its scalars, and build the document. A plain scalar's type is
    resolved again from its substituted text (``port: ${PORT}`` is an int), a quoted one stays a string."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _substitute_nodes(node, loader, origin)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _substitute_nodes(root: yaml.Node, loader: yaml.SafeLoader, origin: str) -> None:
    """``${ENV}`` in every scalar under ``root``, each node once (anchors and aliases share nodes)."""
    seen: set[int] = set()
    todo = [root]
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            todo.extend(n for pair in node.value for n in pair)
        elif isinstance(node, yaml.SequenceNode):
            todo.extend(node.value)
        elif isinstance(node, yaml.ScalarNode) and "${" in node.value:
            where = f"{origin}: line {node.start_mark.line + 1}"
            implicit = node.style is None and node.tag == loader.resolve(
                yaml.ScalarNode, node.value, (True, False)
            )
            node.value = substitute_env(node.value, where)
            if implicit:
                node.tag = loader.resolve(yaml.ScalarNode, node.value, (True, False))


def validate_model(model: type[M], data: Any, origin: str) -> M:
    """Validate a parsed mapping; errors name ``origin``, each field path and its problem."""
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "<root>"
            problems.append(f"{loc}: {err['msg'].removeprefix('Value error, ')}")
        raise ConfigError(f"{origin}: " + "; ".join(problems)) from None


def resolve_paths(section: BaseModel, base: Path) -> None:
    """Make every relative ``Path`` field of ``section`` (and its sub-sections) relative to ``base``."""
    for name in type(section).model_fields:
        value = getattr(section, name)
        if isinstance(value, Path) and not value.is_absolute():
            object.__setattr__(section, name, base / value)
        elif isinstance(value, BaseModel):
            resolve_paths(value, base)


def load_yaml_model(path: str | Path, model: type[M]) -> M:
    """Read, substitute, parse and validate ``path`` as ``model``, with paths relative to the file."""
    p = Path(path)
    cfg = validate_model(model, read_yaml(p), str(p))
    resolve_paths(cfg, p.parent)
    return cfg
