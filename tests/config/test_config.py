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


# --------------------------------------------------------------------------------------------
# errors name the file that holds the problem, and where in it
# --------------------------------------------------------------------------------------------
def _one_line_error(path):
    with pytest.raises(ConfigError) as info:
        get_cfg().merge_from_file(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_base_names_the_base_and_the_referencing_file(tmp_path):
    child = _write(tmp_path, "child.yaml", '_BASE_: "absent_base.yaml"\nSOLVER:\n  MAX_ITER: 9\n')
    message = _one_line_error(child)
    assert "absent_base.yaml" in message and "child.yaml" in message
    assert message.startswith(f"{child}: _BASE_ file not found"), message


def test_malformed_base_names_the_base(tmp_path):
    _write(tmp_path, "base.yaml", "SOLVER: [unclosed\n")
    child = _write(tmp_path, "child.yaml", '_BASE_: "base.yaml"\n')
    message = _one_line_error(child)
    assert message.startswith(str(tmp_path / "base.yaml")) and "child.yaml" in message, message
    assert "malformed YAML" in message


def test_unknown_key_in_base_names_the_base(tmp_path):
    _write(tmp_path, "base.yaml", "SOLVER:\n  BASE_RL: 0.1\n")
    child = _write(tmp_path, "child.yaml", '_BASE_: "base.yaml"\nSOLVER:\n  MAX_ITER: 9\n')
    message = _one_line_error(child)
    assert f"'SOLVER.BASE_RL' in {tmp_path / 'base.yaml'} (the _BASE_ of {child})" in message
    assert "did you mean 'SOLVER.BASE_LR'" in message


def test_wrong_type_in_nested_base_names_that_base(tmp_path):
    _write(tmp_path, "grandparent.yaml", "SOLVER:\n  MAX_ITER: many\n")
    _write(tmp_path, "parent.yaml", '_BASE_: "grandparent.yaml"\n')
    child = _write(tmp_path, "child.yaml", '_BASE_: ["parent.yaml"]\n')
    message = _one_line_error(child)
    assert message.startswith(str(tmp_path / "grandparent.yaml")), message
    assert "SOLVER.MAX_ITER" in message


def test_base_cycle_is_an_error(tmp_path):
    _write(tmp_path, "a.yaml", '_BASE_: "b.yaml"\n')
    b = _write(tmp_path, "b.yaml", '_BASE_: "a.yaml"\n')
    message = _one_line_error(b)
    assert "cycle" in message and "a.yaml" in message


def test_tab_shows_line_and_column(tmp_path):
    path = _write(tmp_path, "tabs.yaml", "SOLVER:\n  MAX_ITER: 9\n\tBASE_LR: 0.1\n")
    message = _one_line_error(path)
    assert message.startswith(path) and "line 3 column 1" in message, message
    assert "tab" in message


def test_non_utf8_file_is_named(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("# caf\u00e9\nSOLVER:\n  MAX_ITER: 9\n".encode("latin-1"))
    message = _one_line_error(str(path))
    assert message.startswith(str(path)) and "not UTF-8" in message and "line 1" in message


@pytest.mark.parametrize("value", [".nan", "1e400", "-.inf"])
def test_non_finite_solver_number_in_file_is_refused(tmp_path, value):
    path = _write(tmp_path, "lr.yaml", f"SOLVER:\n  BASE_LR: {value}\n")
    message = _one_line_error(path)
    assert message.startswith(f"{path}: SOLVER.BASE_LR is ") and "finite" in message, message


def test_non_finite_override_is_refused():
    with pytest.raises(ConfigError, match=r"SOLVER.CLIP_GRADIENTS.CLIP_VALUE is inf; it must be "
                                          r"a finite number"):
        get_cfg().merge_from_list(["SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "1e999"])
    cfg = get_cfg()
    cfg.merge_from_list(["SOLVER.BASE_LR", "1e-3"])
    assert cfg.SOLVER.BASE_LR == 1e-3
