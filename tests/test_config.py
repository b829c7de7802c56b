import pytest

from auditor.config import AuditConfig, load_config, make_config
from auditor.errors import ConfigError


def test_yaml_and_flags_merge_flags_win(tmp_path):
    cfg_file = tmp_path / "audit.yaml"
    cfg_file.write_text("model: resnet18\nlayer: layer4\nmin_fraction: 0.002\nbeam: 3\nartifacts: [watermark, text]\n")
    cfg = load_config(cfg_file, {"beam": 7})
    assert cfg.model == "resnet18" and cfg.layer == "layer4"
    assert cfg.min_fraction == 0.002
    assert cfg.beam == 7  # the flag wins
    assert cfg.artifacts == ("watermark", "text")


def test_relative_paths_in_yaml_are_relative_to_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    cfg_file = tmp_path / "sub" / "audit.yaml"
    cfg_file.write_text("images: imgs\nlabels: labels.csv\n")
    cfg = load_config(cfg_file)
    assert cfg.images == str(tmp_path / "sub" / "imgs")
    assert cfg.labels == str(tmp_path / "sub" / "labels.csv")


def test_unknown_key_is_named_with_suggestion(tmp_path):
    cfg_file = tmp_path / "audit.yaml"
    cfg_file.write_text("model: resnet18\nmin_fractoin: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'min_fractoin'.*min_fraction"):
        load_config(cfg_file)


@pytest.mark.parametrize("values, pattern", [
    ({"beam": 0}, r"'beam'.*greater than or equal to 1.*got 0"),
    ({"max_fraction": 1.5}, r"'max_fraction'.*less than or equal to 1"),
    ({"min_fraction": 0.6, "max_fraction": 0.5}, r"min_fraction \(0.6\) must not exceed max_fraction"),
    ({"device": "tpu"}, r"'device'.*'auto', 'cpu' or 'cuda'.*got 'tpu'"),
    ({"mean": "0.5,0.5"}, r"'mean'"),
    ({"artifacts": "text,text"}, r"lists a concept twice"),
])
def test_invalid_values_name_key_and_value(values, pattern):
    with pytest.raises(ConfigError, match=pattern):
        make_config(values)


def test_comma_strings_become_tuples():
    cfg = make_config({"artifacts": "watermark, text", "mean": "0.485,0.456,0.406"})
    assert cfg.artifacts == ("watermark", "text")
    assert cfg.mean == pytest.approx((0.485, 0.456, 0.406))


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(lst)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_config_is_frozen_and_plain():
    cfg = AuditConfig(model="resnet18")
    with pytest.raises(Exception):
        cfg.model = "x"  # type: ignore[misc]
    plain = cfg.plain()
    assert plain["model"] == "resnet18" and plain["length"] == 3 and plain["max_fraction"] == 0.5
