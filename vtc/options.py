"""Compressor options against their dataclass field types: checks that name the option, and values read from text.

A compressor's options are its dataclass fields, each with a type annotation (``seed: int = 0``,
``layers: tuple[int, ...] | None = None``). ``create_compressor`` uses ``option_type_errors`` so that
``create_compressor("random", seed="a")`` says ``compressor 'random': option seed must be an int, got 'a'`` instead
of failing later inside ``select`` with a bare ``invalid literal for int()``. Command lines and ``--model_args``
hand values over as text (or as lmms-eval's guesses: ``-1`` arrives as ``-1.0``); ``coerce_options`` converts
them by the field's type first, with the same kind of message when the text is not of that type.

Understood annotations: ``int``, ``float``, ``bool``, ``str``, ``None``, unions / ``Optional``, ``tuple[X, ...]``,
``tuple[X, Y]``, ``list[X]``, ``dict``, ``Literal[...]`` and classes (``isinstance``); anything else is not checked.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import numbers
import types
import typing
from typing import Any

__all__ = ["coerce_options", "coerce_text", "describe", "field_types", "matches", "option_type_errors", "parse_literal"]

_NONE_WORDS = ("none", "null")
_TRUE_WORDS = ("true", "yes", "on", "1")
_FALSE_WORDS = ("false", "no", "off", "0")


def field_types(cls) -> dict[str, Any]:
    """``{option: annotation}`` of a compressor dataclass (``{}`` when it is not one or its hints cannot be read)."""
    if not dataclasses.is_dataclass(cls):
        return {}
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an annotation that cannot be evaluated is simply not checked
        hints = {}
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def _union_args(tp) -> tuple | None:
    if typing.get_origin(tp) is typing.Union or isinstance(tp, types.UnionType):
        return typing.get_args(tp)
    return None


def matches(value, tp) -> bool:
    """Whether ``value`` is of the annotated type ``tp`` (``True`` for annotations this module does not know)."""
    if tp is Any or isinstance(tp, (typing.TypeVar, str)):
        return True
    union = _union_args(tp)
    if union is not None:
        return any(matches(value, arg) for arg in union)
    if tp is None or tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return value in args
    if origin in (tuple, list) or tp in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        if not args:
            return True
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return len(value) == len(args) and all(matches(v, a) for v, a in zip(value, args))
        return all(matches(v, args[0]) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def describe(tp) -> str:
    """The annotated type in words: ``an int``, ``None or an int``, ``a tuple of int``."""
    union = _union_args(tp)
    if union is not None:
        parts = [describe(arg) for arg in union if arg is not type(None)]
        text = " or ".join(parts)
        return f"None or {text}" if type(None) in union else text
    if tp is type(None) or tp is None:
        return "None"
    if tp is bool:
        return "True or False"
    if tp is int:
        return "an int"
    if tp is float:
        return "a number"
    if tp is str:
        return "a str"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (tuple, list):
        inner = args[0] if args else None
        return f"a {origin.__name__}" + (f" of {getattr(inner, '__name__', inner)}" if inner is not None else "")
    if origin is dict or tp is dict:
        return "a dict"
    return f"a {getattr(tp, '__name__', tp)}"


def _message(who: str, key: str, tp, value) -> str:
    return f"{who}: option {key} must be {describe(tp)}, got {value!r}"


def option_type_errors(cls, options: dict, who: str) -> dict[str, str]:
    """``{option: message}`` for every option whose value does not match its field's annotation."""
    types_ = field_types(cls)
    return {key: _message(who, key, types_[key], value) for key, value in options.items()
            if key in types_ and not matches(value, types_[key])}


def coerce_text(text: str, tp, who: str, key: str):
    """``text`` read as a value of the annotated type ``tp``; ``ValueError`` naming the option when it is not one."""
    stripped = text.strip()
    union = _union_args(tp)
    if union is not None:
        if type(None) in union and stripped.lower() in _NONE_WORDS:
            return None
        for arg in union:
            if arg is type(None):
                continue
            try:
                return coerce_text(text, arg, who, key)
            except ValueError:
                pass
        raise ValueError(_message(who, key, tp, text))
    try:
        if tp is bool:
            word = stripped.lower()
            if word in _TRUE_WORDS or word in _FALSE_WORDS:
                return word in _TRUE_WORDS
            raise ValueError
        if tp is int:
            return int(stripped)
        if tp is float:
            return float(stripped)
        if tp is str:
            return text
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin in (tuple, list) or tp in (tuple, list):
            value = parse_literal(stripped)
            if isinstance(value, str) or isinstance(value, numbers.Number):  # "1,2" / "1 2" / "3"
                items = [part for part in stripped.replace(",", " ").split() if part]
            elif isinstance(value, (list, tuple)):
                items = list(value)
            else:
                raise ValueError
            inner = args[0] if args else Any
            values = [coerce_text(item, inner, who, key) if isinstance(item, str) and inner is not str
                      else coerce_value(item, inner, who, key) for item in items]
            value = tuple(values) if (origin or tp) is tuple else list(values)
        elif origin is dict or tp is dict:
            value = parse_literal(stripped)
        else:
            value = parse_literal(stripped)
    except (ValueError, TypeError):
        raise ValueError(_message(who, key, tp, text)) from None
    if not matches(value, tp):
        raise ValueError(_message(who, key, tp, text))
    return value


def parse_literal(text: str):
    """``text`` as a JSON or Python literal (``"3"`` -> 3, ``"[1, 2]"`` -> [1, 2]); otherwise the text itself."""
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            pass
    return text


def coerce_value(value, tp, who: str, key: str):
    """``value`` converted to the annotated type where that is lossless: text is read by ``coerce_text``, an
    integral float given for an int becomes that int (lmms-eval reads ``-1`` as ``-1.0``); anything else is returned
    unchanged (``create_compressor`` then says whether it fits)."""
    if isinstance(value, str):
        if matches(value, tp) and (tp is str or tp is Any):
            return value
        return coerce_text(value, tp, who, key)
    wants_int = tp is int or (_union_args(tp) is not None and int in _union_args(tp)
                              and float not in _union_args(tp))
    if wants_int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def coerce_options(cls, options: dict, who: str) -> dict:
    """``options`` with each value of one of ``cls``'s fields converted by ``coerce_value``; other keys untouched."""
    types_ = field_types(cls)
    out = {}
    for key, value in options.items():
        out[key] = coerce_value(value, types_[key], who, key) if key in types_ else value
    return out
