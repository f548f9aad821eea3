"""pllcli.spec: NAME:k=v option strings coerced through signatures and type hints."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal, Optional

import pytest

from pllcli import spec
from pllcli.errors import UsageError


class Color(enum.Enum):
    red = "red"
    dark_blue = "dark-blue"


def target(pooling: str = "mean", gru: bool = True, k: Optional[int] = None, mode: Literal["a", "b"] = "a",
           color: Color = Color.red, weights: tuple[float, float] = (0.5, 5.0), tasks: tuple[str, ...] = ("x",),
           rate=0.1, steps: list[int] | None = None):
    return locals()


def test_parse_spec_and_pairs():
    assert spec.parse_spec("cc:eps=0.01,schedule=linear", "--objective") == ("cc", {"eps": "0.01", "schedule": "linear"})
    assert spec.parse_spec(" ce ", "--objective") == ("ce", {})
    # repeated items merge (later wins), '-' in keys becomes '_', commas inside brackets stay in the value
    assert spec.parse_pairs(["a=1,rnn-hidden=2", "a=3", "w=[1,2]"], "--model-opt") == {
        "a": "3", "rnn_hidden": "2", "w": "[1,2]"}
    with pytest.raises(UsageError, match=r"--model-opt: options must look like KEY=VALUE, got 'width'"):
        spec.parse_pairs(["width"], "--model-opt")
    with pytest.raises(UsageError, match="--objective: expected NAME"):
        spec.parse_spec(":eps=1", "--objective")


def test_coercion_follows_type_hints():
    raw = spec.parse_pairs("pooling=no,gru=no,k=none,mode=b,color=dark-blue,weights=[1,2.5],tasks=when;who,"
                           "rate=2,steps=1/2/3", "--x")
    got = spec.coerce(target, raw, "--x")
    assert got == {"pooling": "no", "gru": False, "k": None, "mode": "b", "color": Color.dark_blue,
                   "weights": (1.0, 2.5), "tasks": ("when", "who"), "rate": 2.0, "steps": [1, 2, 3]}
    assert type(got["rate"]) is float  # unannotated: the default's type
    assert spec.coerce(target, {"pooling": "yes", "gru": "1", "k": "7", "color": "red"}, "--x") == {
        "pooling": "yes", "gru": True, "k": 7, "color": Color.red}
    assert spec.coerce(target, {"gru": False, "weights": (1, 2)}, "--x") == {"gru": False, "weights": (1, 2)}


@pytest.mark.parametrize("key,value,expected", [
    ("gru", "maybe", r"a bool \(true/false, yes/no, 1/0\)"), ("k", "1.5", "int\\|none"), ("mode", "c", "one of a, b"),
    ("color", "green", "one of red, dark-blue"), ("weights", "1", r"tuple\[float, float\]"),
    ("rate", "fast", "float"),
])
def test_bad_value_names_flag_key_and_type(key, value, expected):
    with pytest.raises(UsageError, match=f"^--augment: key '{key}' expects {expected}, got '{value}'$"):
        spec.coerce(target, {key: value}, "--augment")


def test_unknown_key_lists_valid_ones_and_names_the_flag():
    with pytest.raises(UsageError) as e:
        spec.coerce(target, {"foo": "1"}, "--augment")
    assert str(e.value) == ("--augment: unknown key 'foo' (valid: pooling, gru, k, mode, color, weights, tasks, "
                            "rate, steps)")
    with pytest.raises(UsageError, match=r"--model-opt: unknown key 'n_mels' for model m \(valid: gru"):
        spec.coerce(lambda n_mels, gru=True: None, {"n_mels": "3"}, "--model-opt", skip=("n_mels",), what="model m")


class Base:
    def __init__(self, weight: float = 1.0, schedule: str = "constant"):
        pass


class Child(Base):
    def __init__(self, eps: float = 0.0, **kw):
        super().__init__(**kw)


def open_builder(n_mels: int, **kw):
    return kw


def redirected(n_mels: int, **kw):
    return kw


redirected.__spec_target__ = Child


@dataclass
class Aug:
    gain_db: float = 6.0
    shift: int = 10
    warp: bool = False


def test_describe_classes_dataclasses_and_kwargs_chains():
    assert spec.describe(Child) == [("eps", "float", 0.0), ("weight", "float", 1.0), ("schedule", "str", "constant")]
    assert spec.describe(Aug) == [("gain_db", "float", 6.0), ("shift", "int", 10), ("warp", "bool", False)]
    assert spec.describe(target)[2] == ("k", "int|none", None)
    assert spec.describe(target)[4] == ("color", "red|dark-blue", "red")
    assert spec.describe(open_builder, skip=("n_mels",)) == []
    assert spec.coerce(Child, {"weight": "2", "eps": "1"}, "--objective cc") == {"weight": 2.0, "eps": 1.0}
    assert spec.coerce(redirected, {"eps": "0.5"}, "--x") == {"eps": 0.5}
    with pytest.raises(UsageError, match="unknown key 'width'"):
        spec.coerce(redirected, {"width": "3"}, "--x")
    # a builder that forwards **kw without a __spec_target__ takes any key; numbers are guessed, words stay strings
    assert spec.coerce(open_builder, {"width": "8", "p": "0.5", "pooling": "no"}, "--x") == {
        "width": 8, "p": 0.5, "pooling": "no"}


def test_build_objective_coerces_by_constructor_hints():
    from pllcli.training.objectives import build_objective
    o = build_objective("fixmatch:threshold=0.8,teacher=yes,align=no,on=all")
    assert (o.threshold, o.use_teacher, o.align, o.on) == (0.8, True, False, "all")
    assert o.params == {"threshold": 0.8, "teacher": True, "align": False, "on": "all"}
    assert build_objective("cc:eps=1").params == {"eps": 1.0}
    with pytest.raises(UsageError, match=r"^--objective cc: unknown key 'gamma' \(valid: eps, weight, schedule, "
                                         r"start, end\)$"):
        build_objective("cc:gamma=3")
    with pytest.raises(UsageError, match=r"^--objective fixmatch: key 'teacher' expects a bool"):
        build_objective("fixmatch:teacher=sometimes")
    with pytest.raises(UsageError, match="--pll: unknown objective 'nope'"):
        build_objective("nope", flag="--pll")
