import pytest

from detector.config import ConfigError, get_cfg


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_are_documented():
    import re
    from pathlib import Path

    import detector.config.defaults as defaults

    lines = Path(defaults.__file__).read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^_C\.[A-Z0-9_.]+ = (?!CN\(\))", line):
            assert lines[i - 1].lstrip().startswith("#"), f"undocumented key: {line}"


def test_base_inheritance_and_overrides(tmp_path):
    _write(tmp_path, "base.yaml", "SOLVER:\n  BASE_LR: 0.5\n  MAX_ITER: 7\n")
    child = _write(tmp_path, "child.yaml", '_BASE_: "base.yaml"\nSOLVER:\n  MAX_ITER: 9\n')
    cfg = get_cfg()
    cfg.merge_from_file(child)
    cfg.merge_from_list(["SOLVER.IMS_PER_BATCH", "4"])
    assert cfg.SOLVER.BASE_LR == 0.5
    assert cfg.SOLVER.MAX_ITER == 9
    assert cfg.SOLVER.IMS_PER_BATCH == 4


def test_unknown_key_in_file_suggests_closest(tmp_path):
    path = _write(tmp_path, "bad.yaml", "SOLVER:\n  BASE_RL: 0.1\n")
    with pytest.raises(ConfigError) as e:
        get_cfg().merge_from_file(path)
    msg = str(e.value)
    assert "SOLVER.BASE_RL" in msg and "SOLVER.BASE_LR" in msg and "bad.yaml" in msg
    assert "\n" not in msg


def test_unknown_override_suggests_closest():
    with pytest.raises(ConfigError, match=r"did you mean 'MODEL.RETINANET.NUM_CLASSES'"):
        get_cfg().merge_from_list(["MODEL.RETINANET.NUM_CLASES", "3"])


def test_override_of_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="SOLVER.MAX_ITER"):
        get_cfg().merge_from_list(["SOLVER.MAX_ITER", "many"])


def test_odd_number_of_overrides():
    with pytest.raises(ConfigError, match="KEY VALUE"):
        get_cfg().merge_from_list(["SOLVER.MAX_ITER"])


def test_python_tag_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = _write(
        tmp_path, "evil.yaml",
        f"SOLVER:\n  BASE_LR: !!python/object/apply:os.system ['touch {marker}']\n",
    )
    with pytest.raises(ConfigError, match="evil.yaml"):
        get_cfg().merge_from_file(path)
    assert not marker.exists()


def test_malformed_yaml_names_file(tmp_path):
    path = _write(tmp_path, "broken.yaml", "SOLVER: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        get_cfg().merge_from_file(path)


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        get_cfg().merge_from_file("/nonexistent/config.yaml")
