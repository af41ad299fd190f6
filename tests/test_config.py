import pytest
import yaml

from defect_tune.core.config import ConfigError, TrainConfig, load_config, parse_overrides


def test_defaults_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: resnet18\nloss: focal\nfocal_gamma: 1.5\nlr: 0.01\n")
    config = load_config(path, ["focal_gamma=3", "focal_alpha=dynamic", "cbam=true",
                                "class_weight_overrides={crack: 1.5}"])
    assert (config.model, config.loss, config.lr) == ("resnet18", "focal", 0.01)
    assert config.focal_gamma == 3.0 and config.focal_alpha == "dynamic" and config.cbam is True
    assert config.class_weight_overrides == {"crack": 1.5}
    assert config.epochs == TrainConfig().epochs  # untouched keys keep their defaults


def test_config_is_frozen_and_round_trips_through_yaml():
    config = load_config(None, ["lr=0.003", "augment=hflip+clahe"])
    with pytest.raises(Exception):
        config.lr = 1.0
    assert TrainConfig.model_validate(yaml.safe_load(config.to_yaml())) == config


def test_errors_name_the_key_and_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lerning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: lerning_rate: unknown key"):
        load_config(path)
    with pytest.raises(ConfigError, match="focal_gama: unknown key; did you mean 'focal_gamma'"):
        load_config(None, ["focal_gama=2"])
    with pytest.raises(ConfigError, match="lr: "):
        load_config(None, ["lr=-1"])
    with pytest.raises(ConfigError, match="loss: "):
        load_config(None, ["loss=hinge"])
    with pytest.raises(ConfigError, match="augment: .*unknown transform"):
        load_config(None, ["augment=hflip+warp"])
    with pytest.raises(ConfigError, match="focal_alpha"):
        load_config(None, ["focal_alpha=1.5"])
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(path)


def test_override_syntax():
    assert parse_overrides(["a=1", "b=0.5", "c=true", "d=null", "e=x"]) == {
        "a": 1, "b": 0.5, "c": True, "d": None, "e": "x"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["lr"])
