"""Typed option strings: `NAME:k=v,k=v` and `k=v` lists, coerced through a target's signature.

    name, raw = parse_spec("cc:eps=0.01", "--objective")        # ('cc', {'eps': '0.01'})
    kwargs = coerce(CC, raw, "--objective cc")                    # {'eps': 0.01}
    describe(AugmentConfig)   # [('gain_db', 'float', 6.0), ('shift', 'int', 10), ...]

The target is a class (the `__init__` parameters, following `**kwargs` up the MRO), a dataclass
or a function; `target.__spec_target__` redirects to another target (a builder that forwards
`**kw` to a class). Each value is coerced by its parameter's type hint (or its default's type):
bool only from true/false/yes/no/on/off/1/0, and only where the hint is bool (`pooling=no` stays
the string "no" for a str key); `none`/`null` for Optional; Literal and Enum by value; tuples and
lists of numbers as `[a,b]`, `a;b` or `a/b`. Unknown keys and bad values are `UsageError`s
naming the flag. Values that are not strings (already typed) pass unchanged.
"""
from __future__ import annotations

import enum
import inspect
import types
import typing
from typing import Any, Iterable

from pllcli.errors import UsageError

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_NONE = ("none", "null")
_SEQ_SEPARATORS = (";", "/", ",")


class _Param(typing.NamedTuple):
    name: str
    hint: Any          # a type, a typing construct, or None (unannotated, no default to go by)
    default: Any       # inspect.Parameter.empty when required


# ------------------------------------------------------------------------------ parsing

def _split_top(text: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside [] and ()."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth = max(0, depth - 1)
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def parse_pairs(items: str | Iterable[str] | None, flag: str) -> dict[str, str]:
    """'a=1,b=x' or ['a=1', 'b=x'] -> {'a': '1', 'b': 'x'} (keys with '-' become '_'; later wins)."""
    if items is None:
        return {}
    out: dict[str, str] = {}
    for item in [items] if isinstance(items, str) else items:
        for part in _split_top(item):
            if not part.strip():
                continue
            if "=" not in part:
                raise UsageError(f"{flag}: options must look like KEY=VALUE, got {part.strip()!r}")
            k, v = part.split("=", 1)
            k = k.strip().replace("-", "_")
            if not k:
                raise UsageError(f"{flag}: empty key in {part.strip()!r}")
            out[k] = v.strip()
    return out


def parse_spec(text: str, flag: str) -> tuple[str, dict[str, str]]:
    """'name:k=v,k=v' -> ('name', {'k': 'v', ...}) with the values still strings."""
    name, _, rest = str(text).strip().partition(":")
    if not name.strip():
        raise UsageError(f"{flag}: expected NAME[:KEY=VALUE,...], got {text!r}")
    return name.strip(), parse_pairs(rest, f"{flag} {name.strip()}")


# ------------------------------------------------------------------------------ signatures

def _hints(fn) -> dict:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # unresolvable annotation: fall back to the defaults' types
        return {}


def params(target) -> dict[str, _Param] | None:
    """{name: _Param} of the keyword options `target` takes; None when it takes any key (**kw)."""
    target = getattr(target, "__spec_target__", target)
    if inspect.isclass(target):
        out: dict[str, _Param] = {}
        for cls in target.__mro__:
            init = cls.__dict__.get("__init__")
            if init is None or cls is object:
                continue
            more, open_ = _fn_params(init)
            for k, p in more.items():
                out.setdefault(k, p)
            if not open_:
                return out
        return out
    more, open_ = _fn_params(target)
    return None if open_ else more


def _fn_params(fn) -> tuple[dict[str, _Param], bool]:
    sig = inspect.signature(fn)
    hints = _hints(fn)
    out, open_ = {}, False
    for i, (k, p) in enumerate(sig.parameters.items()):
        if p.kind is p.VAR_KEYWORD:
            open_ = True
            continue
        if p.kind is p.VAR_POSITIONAL or (i == 0 and k in ("self", "cls")):
            continue
        hint = hints.get(k)
        if hint is None and p.default is not p.empty and p.default is not None:
            hint = type(p.default)
        out[k] = _Param(k, hint, p.default)
    return out, open_


def type_name(hint) -> str:
    """A short human name for a type hint: int, float, bool, str, int|none, one of a|b, list[float]."""
    if hint is None or hint is Any:
        return "any"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return "|".join("none" if a is type(None) else type_name(a) for a in args)
    if origin in (tuple, list):
        inner = [a for a in args if a is not Ellipsis]
        if origin is tuple and Ellipsis not in args and len(inner) > 1:
            return f"tuple[{', '.join(type_name(a) for a in inner)}]"
        return f"{origin.__name__}[{type_name(inner[0]) if inner else 'any'}]"
    if inspect.isclass(hint) and issubclass(hint, enum.Enum):
        return "|".join(str(m.value) for m in hint)
    return getattr(hint, "__name__", str(hint))


def describe(target, skip: Iterable[str] = ()) -> list[tuple[str, str, Any]]:
    """[(key, type name, default)] for listings (`--list-objectives`); default None when required."""
    ps = params(target) or {}
    skip = set(skip)
    out = []
    for k, p in ps.items():
        if k in skip:
            continue
        d = None if p.default is inspect.Parameter.empty else p.default
        if isinstance(d, enum.Enum):
            d = d.value
        out.append((k, type_name(p.hint), d))
    return out


# ------------------------------------------------------------------------------ coercion

class _Bad(ValueError):
    pass


def _coerce_value(v: str, hint):
    if hint is None or hint is Any:
        return _guess(v)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and v.lower() in _NONE:
            return None
        for a in sorted((a for a in args if a is not type(None)), key=lambda a: a is str):
            try:
                return _coerce_value(v, a)
            except _Bad:
                pass
        raise _Bad
    if origin is typing.Literal:
        for a in args:
            if str(a) == v or (isinstance(a, bool) and _bool_or_none(v) is a):
                return a
        raise _Bad
    if origin in (tuple, list) or hint in (tuple, list):
        inner = [a for a in args if a is not Ellipsis] or [None]
        items = _split_seq(v)
        if origin is tuple and Ellipsis not in args and len(args) not in (0, len(items)):
            raise _Bad
        kinds = inner if origin is tuple and Ellipsis not in args and args else [inner[0]] * len(items)
        vals = [_coerce_value(x, k) for x, k in zip(items, kinds)]
        return tuple(vals) if (origin or hint) is tuple else vals
    if hint is bool:
        b = _bool_or_none(v)
        if b is None:
            raise _Bad
        return b
    if inspect.isclass(hint) and issubclass(hint, enum.Enum):
        for m in hint:
            if v in (str(m.value), m.name):
                return m
        raise _Bad
    if hint in (int, float):
        try:
            return hint(v)
        except ValueError:
            raise _Bad from None
    if hint is str:
        return v
    try:
        return hint(v)
    except Exception:
        raise _Bad from None


def _bool_or_none(v: str):
    low = v.lower()
    return True if low in _TRUE else False if low in _FALSE else None


def _split_seq(v: str) -> list[str]:
    s = v.strip()
    if s[:1] in "[(" and s[-1:] in "])":
        s = s[1:-1]
    for sep in _SEQ_SEPARATORS:
        if sep in s:
            return [x.strip() for x in s.split(sep) if x.strip()]
    return [s] if s else []


def _guess(v: str):
    """For keys without a type hint (a `**kw` target): int, float, else the string."""
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def coerce(target, raw: dict[str, Any], flag: str, *, skip: Iterable[str] = (), what: str = "") -> dict[str, Any]:
    """raw {key: string} -> {key: typed value} for `target(**result)`; UsageError naming `flag`.

    `skip`: parameters the caller passes itself (not settable from the flag, e.g. n_mels).
    `what`: context for messages, e.g. "model convgru".
    """
    ps = params(target)
    skip = set(skip)
    ctx = f" for {what}" if what else ""
    out = {}
    for k, v in raw.items():
        p = None if ps is None else ps.get(k)
        if ps is not None and (p is None or k in skip):
            valid = ", ".join(n for n in ps if n not in skip) or "none"
            raise UsageError(f"{flag}: unknown key {k!r}{ctx} (valid: {valid})")
        if not isinstance(v, str):
            out[k] = v
            continue
        hint = None if p is None else p.hint
        try:
            out[k] = _coerce_value(v, hint)
        except _Bad:
            raise UsageError(f"{flag}: key {k!r}{ctx} expects {_expected(hint)}, got {v!r}") from None
    return out


def _expected(hint) -> str:
    if hint is bool:
        return "a bool (true/false, yes/no, 1/0)"
    if typing.get_origin(hint) is typing.Literal or (inspect.isclass(hint) and issubclass(hint, enum.Enum)):
        return "one of " + type_name(hint).replace("|", ", ")
    return type_name(hint)
