import dataclasses
from typing import Literal

import pytest

from pipeline.config import ConfigError, from_dict, load_config, parse_override, to_dict, to_json


@dataclasses.dataclass(frozen=True)
class Inner:
    width: int = 8
    ratio: float = 0.5
    kind: Literal["a", "b"] = "a"


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str = "x"
    sizes: tuple[int, ...] = (1, 2)
    pair: tuple[float, int] = (0.5, 1)
    path: str | None = None
    flag: bool = False
    inner: Inner = dataclasses.field(default_factory=Inner)


def test_defaults_file_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('name = "file"\nsizes = [3, 4, 5]\n[inner]\nwidth = 16\n')
    cfg = load_config(Outer, path, ["inner.width=32", "inner.ratio=1", "path=some/where", "flag=true", "pair=[1, 2]"])
    assert cfg == Outer(name="file", sizes=(3, 4, 5), pair=(1.0, 2), path="some/where", flag=True,
                        inner=Inner(width=32, ratio=1.0))
    assert isinstance(cfg.pair[0], float)
    assert isinstance(cfg.inner.ratio, float)
    assert load_config(Outer) == Outer()


def test_override_beats_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('name = "file"\n')
    assert load_config(Outer, path, ['name="cli"']).name == "cli"
    assert load_config(Outer, path, ["name=bare-string"]).name == "bare-string"


@pytest.mark.parametrize(
    "data, key",
    [
        ({"nmae": "x"}, "nmae"),
        ({"inner": {"widht": 3}}, "inner.widht"),
        ({"inner": {"width": "3"}}, "inner.width"),
        ({"inner": {"width": True}}, "inner.width"),
        ({"inner": {"kind": "c"}}, "inner.kind"),
        ({"sizes": [1, "2"]}, "sizes[1]"),
        ({"pair": [1.0, 2.5]}, "pair[1]"),
        ({"pair": [1.0]}, "pair"),
        ({"flag": 1}, "flag"),
        ({"inner": 3}, "inner"),
    ],
)
def test_errors_name_the_key(data, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        from_dict(Outer, data)


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("novalue")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="no flavor"):
        load_config(Outer, "nonexistent", kind="video_tokenizer")


def test_round_trip_through_json():
    cfg = Outer(sizes=(7,), inner=Inner(kind="b"))
    assert from_dict(Outer, to_dict(cfg)) == cfg
    assert '"kind": "b"' in to_json(cfg)


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Outer().name = "y"


def test_sectioned_flavors(tmp_path, monkeypatch):
    import pipeline.config as config

    @dataclasses.dataclass(frozen=True)
    class App:
        model: Inner = dataclasses.field(default_factory=Inner)
        train: Inner = dataclasses.field(default_factory=Inner)

    (tmp_path / "m").mkdir()
    (tmp_path / "t").mkdir()
    (tmp_path / "m" / "tiny.toml").write_text("width = 2\n")
    (tmp_path / "t" / "tiny.toml").write_text('kind = "b"\n')
    (tmp_path / "m" / "only.toml").write_text("width = 3\n")
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "tiny.toml").write_text("[train]\nratio = 0.25\n")
    monkeypatch.setattr(config, "CONFIG_DIR", tmp_path)
    kinds = {"model": "m", "train": "t"}
    app = load_config(App, "tiny", ["train.width=5"], kind=kinds)
    assert app == App(model=Inner(width=2), train=Inner(width=5, kind="b"))
    assert load_config(App, "only", kind=kinds) == App(model=Inner(width=3))
    with pytest.raises(ConfigError, match="no flavor 'huge'.*only, tiny"):
        load_config(App, "huge", kind=kinds)
    app = load_config(App, "tiny", kind={"": "app", "model": "m"})
    assert app == App(model=Inner(width=2), train=Inner(ratio=0.25))
