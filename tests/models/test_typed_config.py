"""models.typed_config: the one loader every job's config goes through."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from models.typed_config import Choice, ConfigError, build


class Color(Choice):
    RED = "red"
    BLUE = "blue"


@dataclass
class Inner:
    n: int
    ratio: float = 0.5


@dataclass
class Outer:
    name: str
    color: Color
    inner: Inner
    by_name: dict[str, Inner]
    sizes: list[int]
    limit: int | None
    mode: bool | str
    extra: dict = field(default_factory=dict)


GOOD = {"name": "x", "color": "red", "inner": {"n": 1}, "by_name": {"a": {"n": 2, "ratio": 1}},
        "sizes": [1, 2], "limit": None, "mode": "auto"}


def test_plain_data_becomes_typed_objects():
    out = build(Outer, GOOD, "job")
    assert (out.inner == Inner(1, 0.5) and out.by_name == {"a": Inner(2, 1.0)}
            and isinstance(out.by_name["a"].ratio, float))
    assert out.color == Color.RED and type(out.color) is str  # checked against the enum, kept as the plain value
    assert out.sizes == [1, 2] and out.limit is None and out.mode == "auto" and out.extra == {}


@pytest.mark.parametrize("change,message", [
    ({"colour": "red"}, "job: unknown keys ['colour']"),
    ({"inner": {}}, "job.inner: unknown keys [], missing keys ['n']"),
    ({"color": "green"}, "job.color='green': use one of red, blue"),
    ({"inner": {"n": True}}, "job.inner.n: expected int, got True"),
    ({"inner": {"n": "3"}}, "job.inner.n: expected int, got '3'"),
    ({"by_name": {"a": {"n": 1.5}}}, "job.by_name.a.n: expected int, got 1.5"),
    ({"sizes": "12"}, "job.sizes: expected a list"),
    ({"limit": "many"}, "job.limit='many' is none of"),
])
def test_every_problem_is_one_config_error_naming_the_key(change, message):
    with pytest.raises(ConfigError) as e:
        build(Outer, {**GOOD, **change}, "job")
    assert message in str(e.value)


def test_the_old_error_names_are_the_one_class():
    from preprocess.config import ConfigError as PreprocessError
    from train.config import TrainConfigError
    from train.data import DataConfigError

    assert PreprocessError is TrainConfigError is DataConfigError is ConfigError
    assert issubclass(ConfigError, ValueError)
