"""Every key of a composed config with its value and what it does, for `--help`: the explanations are the comments
of the schema dataclasses (the comment at the end of a field's line, or the comment lines right above it), so the
schema stays the one place a key is documented.

`--help` reaches this through Hydra's help template (conf/config.yaml: `${stas_keys:}`, a resolver registered by
stas.config.register_configs that gets the composed config as `_root_`). The schema of each node is the node's own
type (OmegaConf keeps the dataclass a node was merged onto), so this module needs no list of schemas.
"""

from __future__ import annotations

import ast
import functools
import inspect
import io
import textwrap
import tokenize
from dataclasses import is_dataclass

from omegaconf import DictConfig, ListConfig, OmegaConf

KEY_WIDTH = 44  # key=value column
LINE_WIDTH = 118


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """{field: its comment} of the fields a class defines itself (its source's comments: the one at the end of the
    field's line, after the comment lines right above it)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # made at run time (make_dataclass): no source of its own
        return {}
    lines = source.splitlines()
    comments = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    body = ast.parse(source).body[0]
    found = {}
    for statement in getattr(body, "body", []):
        if not (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)):
            continue
        above, row = [], statement.lineno - 1
        while row >= 1 and lines[row - 1].strip().startswith("#"):
            above.insert(0, comments[row])
            row -= 1
        after = [comments[r] for r in range(statement.lineno, statement.end_lineno + 1)
                 if r in comments and not lines[r - 1].strip().startswith("#")]
        text = " ".join(above + after).strip()
        if text:
            found[statement.target.id] = text
    return found


def field_help(cls: type, name: str) -> str:
    """A field's comment, from the class that defines it (a subclass's own, else its bases')."""
    for klass in getattr(cls, "__mro__", ()):
        text = field_comments(klass).get(name)
        if text:
            return text
    return ""


def undocumented(cfg: DictConfig, prefix: str = "") -> list[str]:
    """The leaf keys of a composed config whose schema field has no comment."""
    return [key for key, _, text in entries(cfg, prefix) if not text]


def entries(node: DictConfig, prefix: str = ""):
    """(dotted key, value shown, explanation) of every leaf below `node`, depth first, in the schema's order."""
    schema = OmegaConf.get_type(node)
    for name in node.keys():
        key = f"{prefix}{name}"
        if key == "hydra":
            continue
        child = node._get_node(name)
        # A schema node's keys are explained one by one; a free mapping (guidance.params) by its own field's comment.
        if (isinstance(child, DictConfig) and not child._is_none() and not child._is_missing()
                and is_dataclass(OmegaConf.get_type(child))):
            yield from entries(node[name], f"{key}.")
            continue
        yield key, _shown(node, name), field_help(schema, name)


def _shown(node: DictConfig, name: str) -> str:
    try:
        value = node[name]
    except Exception:  # noqa: BLE001 - missing (???) or an interpolation that cannot resolve here
        return str(node._get_node(name)._value())
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    return _format(value)


def _format(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(map(_format, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_format(v)}" for k, v in value.items()) + "}"
    if value == "":
        return "''"
    return str(value)


def describe_keys(cfg: DictConfig) -> str:
    """One entry per key: `key=value` (this config's value), then what it does."""
    out = []
    for key, shown, text in entries(cfg):
        head = f"  {key}={shown}"
        if len(head) > KEY_WIDTH - 2 or not text:
            out.append(head)
            head = ""
        if text:
            out += textwrap.wrap(text, LINE_WIDTH, initial_indent=head.ljust(KEY_WIDTH),
                                 subsequent_indent=" " * KEY_WIDTH)
    return "\n".join(out)


def keys_help(*, _root_: DictConfig) -> str:
    """The `${stas_keys:}` resolver of the help template: every key of the composed config, `$` escaped for the
    template."""
    return describe_keys(_root_).replace("$", "$$")
