"""Config loading (YAML + --set, one-line errors) and the stage-output protocol."""

from __future__ import annotations

import json

import pytest
from pydantic import Field

from zerolm.config import StrictModel, build_config, config_hash
from zerolm.errors import UserError
from zerolm.stage import SUCCESS, StageDir, require_done


class Inner(StrictModel):
    min_chars: int = 10
    ratio: float = 0.5


class Outer(StrictModel):
    name: str = "x"
    inner: Inner = Field(default_factory=Inner)
    items: list[dict] = Field(default_factory=list)


class StageLike(StrictModel):
    inner: Inner = Field(default_factory=lambda: Inner(ratio=0.9))  # the stage's own default


def test_a_section_given_in_part_keeps_the_stage_defaults_it_does_not_name(tmp_path):
    assert StageLike().inner.ratio == 0.9
    cfg = build_config(StageLike, overrides=["inner.min_chars=3"])
    assert (cfg.inner.min_chars, cfg.inner.ratio) == (3, 0.9)  # not the section class's 0.5
    assert StageLike.model_validate({"inner": {"ratio": 0.1}}).inner.ratio == 0.1
    from train.grpo import GRPOConfig
    from train.ppo import PPOConfig

    rl = GRPOConfig.model_validate({"output": "o", "optim": {"lr": 1e-4}})
    assert (rl.optim.lr, rl.optim.weight_decay, rl.optim.min_lr_ratio) == (1e-4, 0.0, 1.0)
    ppo = PPOConfig.model_validate({"output": "o", "policy": {"clip": 0.1}})
    assert (ppo.policy.clip, ppo.policy.kl_estimator, ppo.policy.epochs) == (0.1, "k1", 2)


def test_yaml_then_flags_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: fromfile\ninner:\n  min_chars: 5\n", encoding="utf-8")
    cfg = build_config(Outer, config_file=f, flags={"name": "fromflag"}, overrides=["inner.ratio=0.25"])
    assert (cfg.name, cfg.inner.min_chars, cfg.inner.ratio) == ("fromflag", 5, 0.25)


def test_misspelt_key_is_one_line_naming_the_key(tmp_path):
    with pytest.raises(UserError) as err:
        build_config(Outer, overrides=["inner.min_charz=3"])
    assert str(err.value) == "config error: inner.min_charz: unknown key"
    with pytest.raises(UserError) as err:
        build_config(Outer, overrides=["inner.min_chars=lots"])
    assert "inner.min_chars" in str(err.value) and "\n" not in str(err.value)


def test_bad_override_syntax_and_bad_yaml(tmp_path):
    with pytest.raises(UserError, match="key=value"):
        build_config(Outer, overrides=["inner.min_chars"])
    f = tmp_path / "bad.yaml"
    f.write_text("a: [unclosed\n", encoding="utf-8")
    with pytest.raises(UserError, match="not valid YAML"):
        build_config(Outer, config_file=f)
    with pytest.raises(UserError, match="not found"):
        build_config(Outer, config_file=tmp_path / "missing.yaml")


def test_list_element_override():
    cfg = build_config(Outer, base={"items": [{"a": 1}]}, overrides=["items.0.a=2"])
    assert cfg.items == [{"a": 2}]


def test_config_hash_ignores_key_order():
    assert config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1})
    assert config_hash(Outer()) != config_hash(Outer(name="y"))


def test_stage_protocol(tmp_path):
    out = tmp_path / "out"
    stage = StageDir(out, "data", "h1")
    assert stage.begin() is True
    (out / "partial.parquet").write_text("half", encoding="utf-8")
    with pytest.raises(UserError, match="no _SUCCESS"):
        require_done(out, "data")
    # killed half-way: a rerun cleans the leftovers and starts again
    assert StageDir(out, "data", "h1").begin() is True
    assert not (out / "partial.parquet").exists()
    stage.finish(rows=3)
    assert json.loads((out / SUCCESS).read_text())["rows"] == 3
    assert require_done(out, "data")["config_hash"] == "h1"
    assert StageDir(out, "data", "h1").begin() is False  # same config: no-op
    with pytest.raises(UserError, match="another config"):
        StageDir(out, "data", "h2").begin()
    assert StageDir(out, "data", "h2").begin(overwrite=True) is True
    with pytest.raises(UserError, match="expected 'tokenizer'"):
        StageDir(out, "data", "h2").finish() or require_done(out, "tokenizer")


def test_never_deletes_a_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("precious", encoding="utf-8")
    with pytest.raises(UserError, match="not written by zerolm"):
        StageDir(tmp_path, "data", "h").begin(overwrite=True)
    assert (tmp_path / "mine.txt").read_text() == "precious"


def test_an_output_that_is_a_file_is_a_one_line_error_and_the_file_is_kept(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("precious", encoding="utf-8")
    for overwrite in (False, True):
        with pytest.raises(UserError, match="exists and is not a folder"):
            StageDir(f, "data", "h").begin(overwrite=overwrite)
    assert f.read_text() == "precious"
