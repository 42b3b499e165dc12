import subprocess
import sys

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from paramshare import config
from paramshare.config import Config, ConfigError, from_dict, load

from .conftest import ROOT


def test_params_yaml_is_valid_and_matches_the_defaults():
    assert load(ROOT / "params.yaml") == Config()


def test_flatten_names_every_knob():
    flat = config.flatten(Config().to_dict())
    assert flat["model.tied"] is True
    assert flat["model.attention.depth"] == 4
    assert flat["variants"] == "conv,recurrent,attention,soft,mlp"


@pytest.mark.parametrize("raw, key, allowed", [
    ({"variants": ["conv", "lstm"]}, "variants", "conv, recurrent, attention, soft, mlp"),
    ({"variants": []}, "variants", "non-empty list"),
    ({"model": {"tied": "yes"}}, "model.tied", "true or false"),
    ({"model": {"tied": 1}}, "model.tied", "true or false"),
    ({"train": {"epochs": 0}}, "train.epochs", "> 0"),
    ({"train": {"epochs": 2.5}}, "train.epochs", "integer"),
    ({"train": {"lr": -0.1}}, "train.lr", "> 0"),
    ({"train": {"lr": "fast"}}, "train.lr", "finite number"),
    ({"train": {"batch_size": 0}}, "train.batch_size", "> 0"),
    ({"train": {"lr_schedule": "step"}}, "train.lr_schedule", "cosine, constant"),
    ({"train": {"device": "tpu"}}, "train.device", "auto, cpu, cuda, mps"),
    ({"train": {"distributed": -1}}, "train.distributed", ">= 0"),
    ({"train": {"distributed": 1.5}}, "train.distributed", "integer"),
    ({"data": {"train_size": 55001}}, "data.train_size", "55000"),
    ({"data": {"train_size": 9}}, "data.train_size", "one per class"),
    ({"data": {"val_size": 10000, "train_size": 55000}}, "data.train_size", "50000"),
    ({"model": {"conv": {"kernel": 5}}}, "model.conv.kernel", "allowed keys: channels, hidden"),
    ({"trian": {}}, "trian", "allowed keys: seed, data, model, train, variants"),
    ({"model": {"attention": {"heads": 3}}}, "model.attention.heads", "divide"),
    ({"model": {"attention": {"patch": 5}}}, "model.attention.patch", "1, 2, 4, 7, 14, 28"),
    ({"model": {"soft": {"strength": 0}}}, "model.soft.strength", "> 0"),
    ({"seed": -1}, "seed", ">= 0"),
])
def test_bad_values_name_the_key_and_what_is_allowed(raw, key, allowed):
    with pytest.raises(ConfigError) as err:
        from_dict(raw)
    message = str(err.value)
    assert message.startswith(key + ":"), message
    assert allowed in message
    assert "\n" not in message


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read params file"):
        load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load(bad)


def test_a_stage_refuses_bad_params_before_training(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"]["tied"] = "no"
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, str(ROOT / "stages/train.py"), "conv", "--params", str(bad)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: params: model.tied: got 'no'; allowed: true or false"
    assert not (tmp_path / "models").exists() and not (tmp_path / "metrics").exists()

POSITIVE_INT_KEYS = [("train", "epochs"), ("train", "batch_size"), ("model", "conv", "channels"),
                     ("model", "recurrent", "hidden"), ("model", "attention", "depth"), ("model", "mlp", "hidden")]


def _with(path, value) -> dict:
    raw: dict = {}
    node = raw
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value
    return raw


@settings(max_examples=150, deadline=None)
@given(path=st.sampled_from(POSITIVE_INT_KEYS),
       value=st.one_of(st.integers(max_value=0), st.floats(allow_nan=True), st.text(max_size=5),
                       st.booleans(), st.none(), st.lists(st.integers(), max_size=2)))
def test_any_invalid_positive_integer_is_refused_naming_its_key(path, value):
    if isinstance(value, float) and value.is_integer() and value > 0:
        return
    with pytest.raises(ConfigError) as err:
        from_dict(_with(path, value))
    assert str(err.value).startswith(".".join(path) + ":")


@settings(max_examples=150, deadline=None)
@given(path=st.sampled_from(POSITIVE_INT_KEYS), value=st.integers(min_value=1, max_value=10**6))
def test_any_positive_integer_is_accepted(path, value):
    cfg = from_dict(_with(path, value))
    node = cfg
    for part in path:
        node = getattr(node, part)
    assert node == value


@settings(max_examples=100, deadline=None)
@given(val=st.integers(min_value=-10, max_value=70_000), train=st.integers(min_value=-10, max_value=70_000))
def test_split_sizes_are_accepted_exactly_when_they_fit(val, train):
    fits = 10 <= val <= 59_990 and 10 <= train <= 60_000 - val
    raw = {"data": {"val_size": val, "train_size": train}}
    if fits:
        assert from_dict(raw).data.train_size == train
    else:
        with pytest.raises(ConfigError, match=r"^data\.(val_size|train_size):"):
            from_dict(raw)


@settings(max_examples=100, deadline=None)
@given(key=st.text(min_size=1, max_size=8).filter(lambda k: k not in ("seed", "data", "model", "train", "variants")))
def test_any_unknown_top_level_key_is_refused(key):
    with pytest.raises(ConfigError, match="unknown key; allowed keys: seed, data, model, train, variants"):
        from_dict({key: 1})
