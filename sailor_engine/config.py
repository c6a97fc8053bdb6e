"""A run's configuration: the component sections composed into one `Config`, loaded from YAML, TOML or
JSON, overridden from the command line, and validated before any compute.

Each section's Struct lives beside its component (model/config.py, parallel/config.py, synth/,
rollout/, rl/, train/), with one description per field; this module only composes them and does
the I/O, so nothing is declared twice. Every error is a `ConfigError` naming where (file and line,
or the `--set` that caused it) and the dotted field path:

    cfg = load_config("examples/tiny.yaml", ["train.rl.lr=1e-6", "model.rope_scaling.factor=8"])
    print(dump_config(cfg, "toml"))
    for f in config_fields():
        print(f.path, f.type, f.default, f.description)

YAML is read with YAML 1.2 core-schema scalars: `lr: 1e-5` is a float (PyYAML's YAML 1.1 reads a
string), `off` / `no` are strings and `010` is ten. `--set` values are YAML flow scalars or
collections (`parallel.tp=2`, `model.head_dim=null`, `rollout.tools=[search]`).
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, NamedTuple

import msgspec
import msgspec.inspect as mi
import yaml
from msgspec import Meta

from sailor_engine.model.config import ModelConfig
from sailor_engine.parallel.config import ParallelConfig
from sailor_engine.rl.config import AlgoConfig
from sailor_engine.rollout.config import RolloutConfig
from sailor_engine.synth.config import SynthConfig
from sailor_engine.train.config import TrainConfig

FORMATS = ("yaml", "toml", "json")
_SUFFIXES = {".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".json": "json"}


class ConfigError(ValueError):
    """A config that cannot be read or is invalid; the message names the source and the field path."""


class Config(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Everything one run needs; every section is optional and defaults to its Struct's defaults."""

    model: Annotated[ModelConfig, Meta(description="Decoder architecture (Llama / Qwen2 / Qwen3).")] = ModelConfig()
    parallel: Annotated[ParallelConfig, Meta(description="Tensor x pipeline x data-parallel layout.")] = ParallelConfig()
    synth: Annotated[SynthConfig, Meta(description="Knowledge-graph QA synthesis and the offline web.")] = SynthConfig()
    rollout: Annotated[RolloutConfig, Meta(description="Sampling, episode limits and tools of the ReAct agent loop.")] = RolloutConfig()
    algo: Annotated[AlgoConfig, Meta(description="RL algorithm: advantages, batch construction, loss, reward.")] = AlgoConfig()
    train: Annotated[TrainConfig, Meta(description="Phases, optimizer, checkpoints, eval and logging.")] = TrainConfig()

    def __post_init__(self) -> None:
        # Constraints between sections; those within one section live in its own Struct.
        m, p = self.model, self.parallel
        if m.num_heads % p.tp:
            raise ValueError(f"parallel.tp ({p.tp}) must divide model.num_heads ({m.num_heads})")
        if m.num_kv_heads % p.tp and p.tp % m.num_kv_heads:
            raise ValueError(f"parallel.tp ({p.tp}) and model.num_kv_heads ({m.num_kv_heads}): one must divide the "
                             "other (KV heads are split over the tp ranks, or replicated when fewer)")
        if p.pp > m.num_layers:
            raise ValueError(f"parallel.pp ({p.pp}) must be <= model.num_layers ({m.num_layers}): each stage needs a layer")
        ctx = self.rollout.max_context
        if ctx is not None and ctx > m.max_position_embeddings:
            raise ValueError(f"rollout.max_context ({ctx}) must be <= model.max_position_embeddings "
                             f"({m.max_position_embeddings})")
        if self.synth.expert_max_tokens > m.max_position_embeddings:
            raise ValueError(f"synth.expert_max_tokens ({self.synth.expert_max_tokens}) must be <= "
                             f"model.max_position_embeddings ({m.max_position_embeddings}): RFT trains on them")
        source = "rollout.max_context" if ctx is not None else "model.max_position_embeddings"
        if self.train.micro_batch_tokens < self.max_context:
            raise ValueError(f"train.micro_batch_tokens ({self.train.micro_batch_tokens}) must hold one whole "
                             f"trajectory: >= {source} ({self.max_context})")
        q, u = self.train.rl.questions_per_step, self.algo.updates_per_batch
        if q % u:
            raise ValueError(f"train.rl.questions_per_step ({q}) must split into algo.updates_per_batch ({u}) "
                             "equal mini-batches")

    @property
    def max_context(self) -> int:
        """Token budget of one trajectory: rollout.max_context, else the model's longest sequence."""
        return self.rollout.max_context or self.model.max_position_embeddings


# --- YAML 1.2 core-schema scalars ------------------------------------------------------------------
# PyYAML implements YAML 1.1: `1e-5` (no dot) is a string, `no` / `off` are booleans, `010` is
# octal, `1:30` is 90 and `2024-01-01` a date; each surprises someone. The loader and the dumper
# share one table so that whatever dump_config writes reads back unchanged.

_INT, _FLOAT, _BOOL, _TIMESTAMP = (f"tag:yaml.org,2002:{t}" for t in ("int", "float", "bool", "timestamp"))
_SCALARS = (
    (_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), "tTfF"),
    (_INT, re.compile(r"^[-+]?(?:[0-9][0-9_]*|0x[0-9a-fA-F_]+|0o[0-7_]+)$"), "-+0123456789"),
    (_FLOAT, re.compile(r"""^(?:[-+]?(?:\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?    # .5, .5e-3
                                  |[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+  # 1e-5, 1.5e-5
                                  |[0-9][0-9_]*\.[0-9_]*                      # 1., 1.5
                                  |\.(?:inf|Inf|INF))
                              |\.(?:nan|NaN|NAN))$""", re.X), "-+0123456789."),
)


def _resolver_table() -> dict[str, list]:
    table: dict[str, list] = {}
    for first, pairs in yaml.SafeLoader.yaml_implicit_resolvers.items():
        kept = [(tag, rx) for tag, rx in pairs if tag not in (_INT, _FLOAT, _BOOL, _TIMESTAMP)]
        if kept:
            table[first] = kept
    for tag, rx, firsts in _SCALARS:
        for first in firsts:
            table.setdefault(first, []).append((tag, rx))
    return table


class _Loader(yaml.SafeLoader):
    yaml_implicit_resolvers = _resolver_table()

    def construct_yaml_int(self, node):  # decimal (leading zeros allowed), 0x hex, 0o octal
        text = self.construct_scalar(node).replace("_", "")
        sign, digits = (-1, text[1:]) if text[0] == "-" else (1, text.lstrip("+"))
        return sign * int(digits, 0 if digits[:2] in ("0x", "0o") else 10)

    def construct_mapping(self, node, deep=False):
        # PyYAML keeps the last of two equal keys; a config should say which line repeats one.
        seen = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key.value!r}", key.start_mark)
            seen.add(key.value if isinstance(key, yaml.ScalarNode) else id(key))
        return super().construct_mapping(node, deep)


_Loader.add_constructor(_INT, _Loader.construct_yaml_int)


class _Dumper(yaml.SafeDumper):
    yaml_implicit_resolvers = _Loader.yaml_implicit_resolvers


def _represent_list(dumper: _Dumper, data: list | tuple) -> yaml.Node:
    # Lists of scalars on one line (`betas: [0.9, 0.999]`), everything else in block style.
    flow = not any(isinstance(x, (dict, list, tuple)) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


for _seq in (list, tuple):
    _Dumper.add_representer(_seq, _represent_list)


# --- reading ---------------------------------------------------------------------------------------

def _read_file(path: Path) -> tuple[Any, yaml.Node | None]:
    """Parse a config file into plain data; the YAML node tree comes along to locate lines."""
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(f"{path}: unknown config format {path.suffix!r} (expected .yaml, .yml, .toml or .json)")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    if fmt == "json":
        try:
            return msgspec.json.decode(data), None
        except msgspec.DecodeError as e:
            m = re.search(r"\(byte (\d+)\)$", str(e))
            where = _line_col(path, data[: int(m.group(1))]) if m else path
            problem = re.sub(r" \(byte \d+\)$", "", str(e).removeprefix("JSON is malformed: "))
            raise ConfigError(f"{where}: invalid JSON: {problem}") from None
    try:
        text = data.decode()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{_line_col(path, data[:e.start])}: not UTF-8 text") from None
    if fmt == "toml":
        try:
            return tomllib.loads(text), None
        except tomllib.TOMLDecodeError as e:
            m = re.search(r"^(.*) \(at line (\d+), column (\d+)\)$", str(e))
            where, problem = (f"{path}:{m.group(2)}:{m.group(3)}", m.group(1)) if m else (path, str(e))
            raise ConfigError(f"{where}: invalid TOML: {problem}") from None
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        return (None if node is None else loader.construct_document(node)), node
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        context = f" ({e.context})" if e.context and e.problem else ""
        raise ConfigError(f"{where}: invalid YAML: {e.problem or e.context}{context}") from None
    finally:
        loader.dispose()


def _line_col(path: Path, before: bytes) -> str:
    line, col = before.count(b"\n") + 1, len(before) - before.rfind(b"\n")
    return f"{path}:{line}:{col}"


def _yaml_line(node: yaml.Node | None, parts: tuple, exact: bool = False) -> int | None:
    """1-based line of the deepest key (or item) of `parts` present in the YAML tree (exact: of the last)."""
    line, depth = None, 0
    for part in parts:
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            hit = next(((k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == part), None)
            if hit is None:
                break
            line, node = hit[0].start_mark.line + 1, hit[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
        depth += 1
    return None if exact and depth < len(parts) else line


# --- the schema, as msgspec.inspect sees it ----------------------------------------------------------

@functools.cache
def _schema() -> mi.StructType:
    return mi.type_info(Config)


def _unwrap(t: mi.Type) -> tuple[mi.Type, str]:
    """(the type without its Meta, the field description)."""
    if isinstance(t, mi.Metadata):
        return t.type, (t.extra_json_schema or {}).get("description", "")
    return t, ""


def _struct_in(t: mi.Type) -> mi.StructType | None:
    """The Struct a field holds (also through `Struct | None`), or None for a plain value."""
    t = _unwrap(t)[0]
    if isinstance(t, mi.UnionType):
        return next((x for x in map(lambda x: _unwrap(x)[0], t.types) if isinstance(x, mi.StructType)), None)
    return t if isinstance(t, mi.StructType) else None


def _type_at(parts: tuple) -> mi.Type | None:
    """The type at a path of field names and item indices, or None where the path leaves the schema."""
    t: mi.Type | None = _schema()
    for part in parts:
        t = _unwrap(t)[0]
        if isinstance(part, str):
            struct = _struct_in(t)
            t = next((f.type for f in struct.fields if f.name == part), None) if struct else None
        elif isinstance(t, mi.TupleType):
            t = t.item_types[part] if part < len(t.item_types) else None
        elif isinstance(t, (mi.VarTupleType, mi.ListType)):
            t = t.item_type
        else:
            t = None
        if t is None:
            return None
    return _unwrap(t)[0]


def _fmt(t: mi.Type, struct: str = "") -> str:
    """A type as a user reads it: `int >= 1`, `float in (0, 1]`, `'auto' | 'nccl'`, `list[str]`.

    A Struct is shown by its class name, or as `struct` where given (errors say "mapping").
    """
    t = _unwrap(t)[0]
    if isinstance(t, (mi.IntType, mi.FloatType)):
        name = "int" if isinstance(t, mi.IntType) else "float"
        lo = (">", t.gt) if t.gt is not None else (">=", t.ge) if t.ge is not None else None
        hi = ("<", t.lt) if t.lt is not None else ("<=", t.le) if t.le is not None else None
        if lo and hi:
            return f"{name} in {'(' if lo[0] == '>' else '['}{lo[1]:g}, {hi[1]:g}{')' if hi[0] == '<' else ']'}"
        return f"{name} {lo[0]} {lo[1]:g}" if lo else f"{name} {hi[0]} {hi[1]:g}" if hi else name
    if isinstance(t, mi.StrType):
        return f"str of length >= {t.min_length}" if t.min_length else "str"
    if isinstance(t, mi.LiteralType):
        return " | ".join(map(repr, t.values))
    if isinstance(t, mi.UnionType):
        return " | ".join(_fmt(x, struct) for x in t.types)
    if isinstance(t, mi.TupleType):
        return f"[{', '.join(_fmt(x, struct) for x in t.item_types)}]"
    if isinstance(t, (mi.VarTupleType, mi.ListType)):
        return f"list[{_fmt(t.item_type, struct)}]"
    if isinstance(t, mi.StructType):
        return struct or t.cls.__name__
    return {mi.BoolType: "bool", mi.NoneType: "null", mi.AnyType: "any"}.get(type(t), type(t).__name__)


def _show(value: Any) -> str:
    """A value as the user wrote it (YAML spelling for null and booleans)."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, (list, tuple)):
        return f"[{', '.join(map(_show, value))}]"
    return repr(value)


def _unknown(prefix: tuple, name: str, struct: mi.StructType) -> str:
    names = [f.name for f in struct.fields]
    dotted = ".".join((*prefix, name))
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    hint = f"did you mean '{'.'.join((*prefix, close[0]))}'?" if close else f"valid: {', '.join(names)}"
    return f"unknown field '{dotted}' ({hint})"


# --- overrides ---------------------------------------------------------------------------------------

_KEY = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")


def _apply_override(raw: dict, text: str) -> tuple[str, ...]:
    """Set `a.b.c=value` in the raw mapping; the path must name a field. Returns the path."""
    key, eq, value_text = text.partition("=")
    key = key.strip()
    if not eq or not _KEY.fullmatch(key):
        raise ConfigError(f"--set {text}: expected SECTION.FIELD=VALUE, e.g. train.rl.lr=1e-6")
    try:
        value = yaml.load(value_text, Loader=_Loader) if value_text.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text}: invalid value: {getattr(e, 'problem', None) or e}") from None
    parts = tuple(key.split("."))
    node, struct = raw, _schema()
    for i, name in enumerate(parts):
        field = next((f for f in struct.fields if f.name == name), None)
        if field is None:
            raise ConfigError(f"--set {text}: {_unknown(parts[:i], name, struct)}")
        if i == len(parts) - 1:
            break
        struct = _struct_in(field.type)
        dotted = ".".join(parts[: i + 1])
        if struct is None:
            raise ConfigError(f"--set {text}: {dotted} is a value ({_fmt(field.type)}), not a section")
        if node.get(name) is None:
            node[name] = {}
        elif not isinstance(node[name], dict):
            raise ConfigError(f"--set {text}: {dotted} is not a mapping in the config file")
        node = node[name]
    node[name] = _as_str_if_wanted(value, value_text.strip(), field.type)
    return parts


def _as_str_if_wanted(value: Any, text: str, t: mi.Type) -> Any:
    """`train.out_dir=2024` means the string "2024": keep the text where the field takes str, not the number."""
    t = _unwrap(t)[0]
    kinds = {type(_unwrap(x)[0]) for x in (t.types if isinstance(t, mi.UnionType) else (t,))}
    scalar = {bool: mi.BoolType, int: mi.IntType, float: mi.FloatType}.get(type(value))
    return text if scalar and mi.StrType in kinds and scalar not in kinds else value


# --- validation ----------------------------------------------------------------------------------------

class _Source(NamedTuple):
    path: Path | None
    node: yaml.Node | None
    overrides: list[tuple[tuple, str]]  # (path, the --set text), in order

    def where(self, parts: tuple, check: str | None = None) -> str | None:
        """Where the value at `parts` came from. A failed cross-field `check` (its message) names the
        file, at the first field the message names that the file sets, and the --set options of the
        fields it names (else all inside the section), since any of them may be the culprit."""
        inside = [text for set_parts, text in self.overrides
                  if set_parts[: len(parts)] == parts or parts[: len(set_parts)] == set_parts]
        if inside and check is None:
            return f"--set {inside[-1]}"  # the last --set of a path wins
        named = re.findall(r"\b([a-z]\w*(?:\.\w+)+)", check or "")
        inside = [t for t in inside if t.partition("=")[0].strip() in named] or inside
        lines = [_yaml_line(self.node, tuple(p.split(".")), exact=True) for p in named]
        line = next(filter(None, lines), None) or _yaml_line(self.node, parts)
        file = [] if self.path is None else [f"{self.path}:{line}" if line else str(self.path)]
        return ", ".join(file + [f"--set {text}" for text in inside]) or None


def _lookup(raw: Any, parts: tuple) -> Any:
    for part in parts:
        try:
            raw = raw[part]
        except (KeyError, IndexError, TypeError):
            return msgspec.UNSET
    return raw


def _explain(message: str, raw: dict) -> tuple[tuple, str, bool]:
    """Translate a msgspec ValidationError into (field path, house-style message, is a __post_init__ check)."""
    m = re.fullmatch(r"(.*) - at `(?:key` in `)?\$(.*)`", message, re.S)
    problem, at = (m.group(1), m.group(2)) if m else (message, "")
    parts = tuple(int(i) if i else name for name, i in re.findall(r"\.(\w+)|\[(\d+)\]", at))
    dotted = ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in parts).replace(".[", "[") or "top level"
    value = _lookup(raw, parts)
    got = "" if value is msgspec.UNSET or isinstance(value, (dict, list)) else f" {_show(value)}"
    t = _type_at(parts)
    kind = {"object": "mapping", "array": "list"}
    if m and "` in `" in message:
        text = f"{dotted}: every key must be a string"
    elif k := re.fullmatch(r"Object contains unknown field `(.+)`", problem):
        text, parts = _unknown(parts, k.group(1), _struct_in(t)), parts + (k.group(1),)
    elif k := re.fullmatch(r"Object missing required field `(.+)`", problem):
        text, parts = f"{dotted}.{k.group(1)} is required", parts + (k.group(1),)
    elif k := re.fullmatch(r"Expected `(.+?)`, got `(.+?)`", problem):
        expected = _fmt(t, "mapping") if t is not None else kind.get(k.group(1), k.group(1))
        text = f"{dotted}: expected {expected}, got {kind.get(k.group(2), k.group(2))}{got}"
    elif k := re.fullmatch(r"Expected `\w+` ([<>]=?) (\S+)", problem):
        text = f"{dotted} must be {k.group(1)} {k.group(2)}, got{got}"
    elif k := re.fullmatch(r"Expected `\w+` of length (.+?)(, got .*)?", problem):
        text = f"{dotted} must have length {k.group(1)}{k.group(2) or ', got' + got}"
    elif problem.startswith("Invalid enum value") and isinstance(t, mi.LiteralType):
        text = f"{dotted} must be one of {', '.join(map(repr, t.values))}, got{got}"
    elif problem.startswith("Invalid enum value"):
        text = f"{dotted}: expected {_fmt(t, 'mapping')}, got {type(value).__name__}{got}"
    elif problem.startswith("Expected"):
        text = f"{dotted}: {problem[0].lower()}{problem[1:]}, got{got}"
    else:
        return parts, problem, True  # a __post_init__ check: its message names its fields
    return parts, text, False


def _build(raw: dict, source: _Source) -> Config:
    try:
        return msgspec.convert(raw, Config)
    except msgspec.ValidationError as e:
        parts, message, check = _explain(str(e), raw)
        where = source.where(parts, message if check else None)
        raise ConfigError(f"{where}: {message}" if where else message) from None


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a .yaml / .yml / .toml / .json config (None: all defaults), apply `a.b=value` overrides, validate."""
    raw, node = ({}, None) if path is None else _read_file(Path(path))
    if raw is None:
        raw = {}  # an empty file: every section at its defaults
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    applied = [(_apply_override(raw, text), text) for text in overrides]
    return _build(raw, _Source(None if path is None else Path(path), node, applied))


# --- writing and listing -----------------------------------------------------------------------------

def dump_config(cfg: Config, fmt: str = "yaml") -> str:
    """The config as YAML, TOML or JSON text that load_config reads back into an equal Config."""
    data = msgspec.to_builtins(cfg)
    if fmt == "yaml":
        return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)
    if fmt == "json":
        return msgspec.json.format(msgspec.json.encode(data), indent=2).decode() + "\n"
    if fmt == "toml":
        return "\n".join(_toml_table(data, ())) + "\n"
    raise ConfigError(f"unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")


def _toml_table(table: dict, prefix: tuple) -> list[str]:
    lines = [f"[{'.'.join(prefix)}]"] if prefix else []
    tables = []
    for key, value in table.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif value is None:
            # TOML has no null: leave the key out, which reads back as the field's default.
            default = _default_at(prefix + (key,))
            if default is not None:
                raise ConfigError(f"{'.'.join(prefix + (key,))} = null cannot be written as TOML (no null there, and "
                                  f"the default is {_show(default)}); use yaml or json")
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    for key, value in tables:
        lines += ([""] if lines else []) + _toml_table(value, prefix + (key,))
    return lines


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else "inf" if v > 0 else "-inf"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):  # JSON string escapes are valid TOML basic-string escapes, except DEL
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, (list, tuple)):
        return f"[{', '.join(map(_toml_value, v))}]"
    raise TypeError(f"cannot write {type(v).__name__} as a TOML value")


def _default_at(parts: tuple) -> Any:
    struct = _struct_in(_type_at(parts[:-1]))
    return next(f.default for f in struct.fields if f.name == parts[-1])


class FieldDoc(NamedTuple):
    path: str  # dotted, e.g. "model.rope_scaling.factor"
    type: str
    default: str  # "" for a section, "required", or "unset" (filled in by a preset)
    description: str


def config_fields() -> list[FieldDoc]:
    """Every field of Config, depth first, with its type, default and description."""
    out: list[FieldDoc] = []

    def walk(struct: mi.StructType, prefix: str) -> None:
        for f in struct.fields:
            t, description = _unwrap(f.type)
            sub = _struct_in(t)
            if isinstance(f.default, msgspec.Struct):
                default = ""
            elif f.default is not msgspec.NODEFAULT:
                default = _show(f.default)
            else:
                default = "required" if f.required else "unset"
            out.append(FieldDoc(prefix + f.name, _fmt(t), default, description))
            if sub is not None:
                walk(sub, f"{prefix}{f.name}.")

    walk(_schema(), "")
    return out
