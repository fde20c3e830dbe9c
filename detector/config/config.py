"""The config node: fvcore's CfgNode with safe YAML, strict keys and helpful errors.

Every error is a one-line :class:`ConfigError` naming the file (and, for a ``_BASE_`` file, the
file that references it), the key, or the YAML line and column.
"""
import difflib
import math
import os
from typing import Any, Dict, List, Optional, Tuple

import yaml
from fvcore.common.config import BASE_KEY
from fvcore.common.config import CfgNode as _FvCfgNode
from iopath.common.file_io import g_pathmgr

__all__ = ["CfgNode", "ConfigError", "get_cfg"]


class ConfigError(ValueError):
    """A config file or override that cannot be applied; the message names the key or file."""


def _all_keys(node, prefix=""):
    keys = []
    for k, v in node.items():
        full = prefix + k
        keys.append(full)
        if isinstance(v, _FvCfgNode):
            keys.extend(_all_keys(v, full + "."))
    return keys


def _leaf_keys(node, prefix=""):
    keys = []
    for k, v in node.items():
        if isinstance(v, dict):
            keys.extend(_leaf_keys(v, prefix + k + "."))
        else:
            keys.append(prefix + k)
    return keys


def _suggest(full_key, valid_keys):
    close = difflib.get_close_matches(full_key, valid_keys, n=1, cutoff=0.5)
    if not close:  # compare the last component only: "SOLVER.BASE_RL" -> "BASE_LR"
        leaf = full_key.split(".")[-1]
        by_leaf = {k.split(".")[-1]: k for k in valid_keys}
        hits = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
        close = [by_leaf[h] for h in hits]
    return f"; did you mean '{close[0]}'?" if close else ""


def _is_finite_value(value) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_is_finite_value(v) for v in value)
    return True


def _one_line(err):
    msg = err.args[0] if err.args else str(err)
    return " ".join(str(msg).split())


def _yaml_error(err: yaml.YAMLError, source: str) -> ConfigError:
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
    if isinstance(err, yaml.constructor.ConstructorError):
        return ConfigError(f"{source}: YAML tag not allowed{where} ({err.problem}); only plain "
                           "YAML is accepted")
    problem = getattr(err, "problem", None) or getattr(err, "context", None) or _one_line(err)
    hint = "; YAML does not allow tabs, indent with spaces" if "'\\t'" in problem else ""
    return ConfigError(f"{source}: malformed YAML{where}: {' '.join(problem.split())}{hint}")


def _read_yaml(path: str, source: str):
    """The YAML document of ``path`` (safe loader). FileNotFoundError propagates for the caller
    to name the referencing file."""
    with g_pathmgr.open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{source}: not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}); "
                          "save the config as UTF-8") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise _yaml_error(e, source) from None


def _resolve_base(base: str, referencing_file: str) -> str:
    """fvcore's rule: relative _BASE_ paths are relative to the file that names them."""
    if base.startswith("~"):
        base = os.path.expanduser(base)
    if not any(map(base.startswith, ["/", "https://", "http://"])):
        base = os.path.join(os.path.dirname(referencing_file), base)
    return base


def _merge_into(child: Dict[str, Any], base: Dict[str, Any], source: str, prefix: str = ""):
    """Recursively update ``base`` with ``child`` (the values of ``child`` win)."""
    for k, v in child.items():
        if isinstance(v, dict) and k in base:
            if not isinstance(base[k], dict):
                raise ConfigError(f"{source}: '{prefix}{k}' is a section here but a value in "
                                  "its _BASE_")
            _merge_into(v, base[k], source, prefix + k + ".")
        else:
            base[k] = v


class CfgNode(_FvCfgNode):
    """fvcore CfgNode whose loading is safe and whose errors name the file, key or line."""

    def _check_known(self, keys, source):
        valid = _all_keys(self)
        for full_key in keys:
            if full_key not in valid and full_key != BASE_KEY:
                raise ConfigError(
                    f"Unknown config key '{full_key}' in {source}{_suggest(full_key, valid)}"
                )

    def _check_finite(self, keys, source):
        """Numbers set by ``source`` must be finite: a NaN or infinite learning rate (``.nan``,
        ``1e400`` in YAML) would otherwise start a run that can only produce NaN."""
        for full_key in keys:
            node = self
            for part in full_key.split("."):
                node = node[part]
            if not _is_finite_value(node):
                raise ConfigError(f"{source}: {full_key} is {node!r}; it must be a finite number")

    def _merge_checked(self, loaded: "CfgNode", keys: List[str], source: str) -> None:
        try:
            self.merge_from_other_cfg(loaded)
        except (ValueError, KeyError, AssertionError) as e:
            raise ConfigError(f"{source}: {_one_line(e)}") from None
        self._check_finite(keys, source)

    def _check_file(self, data: Dict[str, Any], source: str) -> None:
        """Key names, value types and finiteness of one file on its own, so that an error names
        the file that holds it rather than the file that inherits it."""
        node = self._node_from_dict(data, source)
        self._check_known(_all_keys(node), source)
        probe = self.clone()
        probe.defrost()
        probe._merge_checked(node, _leaf_keys(data), source)

    @classmethod
    def _node_from_dict(cls, data: Dict[str, Any], source: str) -> "CfgNode":
        try:
            return cls(data)
        except AssertionError as e:  # yacs: a value of a type configs cannot hold
            raise ConfigError(f"{source}: {_one_line(e)}") from None

    @classmethod
    def _load_chain(cls, filename: str, schema: Optional["CfgNode"] = None,
                    chain: Tuple[str, ...] = (), source: Optional[str] = None) -> Dict[str, Any]:
        """The dict of ``filename`` merged over its ``_BASE_`` files (recursively); ``schema``,
        when given, checks every file on its own."""
        source = source or filename
        data = _read_yaml(filename, source)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: top level must be a mapping of config keys")
        bases = data.pop(BASE_KEY, None)
        if schema is not None:
            schema._check_file(data, source)
        if bases is None:
            return data
        if isinstance(bases, str):
            bases = [bases]
        if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
            raise ConfigError(f"{source}: _BASE_ must be a file path or a list of paths, "
                              f"got {bases!r}")
        chain = chain + (os.path.abspath(filename),)
        merged: Dict[str, Any] = {}
        for base in bases:
            path = _resolve_base(base, filename)
            if os.path.abspath(path) in chain:
                cycle = " -> ".join(list(chain) + [os.path.abspath(path)])
                raise ConfigError(f"{source}: _BASE_ files form a cycle: {cycle}")
            try:
                base_data = cls._load_chain(path, schema, chain,
                                            source=f"{path} (the _BASE_ of {filename})")
            except FileNotFoundError:
                raise ConfigError(f"{filename}: _BASE_ file not found: {path}") from None
            except IsADirectoryError:
                raise ConfigError(f"{filename}: _BASE_ {path} is a folder, not a file") from None
            _merge_into(base_data, merged, f"{path} (the _BASE_ of {filename})")
        _merge_into(data, merged, source)
        return merged

    @classmethod
    def load_yaml_with_base(cls, filename, allow_unsafe=False):
        """fvcore's ``_BASE_`` inheritance with safe YAML only and one-line errors."""
        if allow_unsafe:
            raise ConfigError("Unsafe YAML loading is not supported; python tags are rejected")
        try:
            return cls._load_chain(filename)
        except FileNotFoundError:
            raise ConfigError(f"Config file not found: {filename}") from None
        except IsADirectoryError:
            raise ConfigError(f"Config file {filename} is a folder") from None

    def merge_from_file(self, cfg_filename, allow_unsafe=False):
        if allow_unsafe:
            raise ConfigError("Unsafe YAML loading is not supported; python tags are rejected")
        try:
            loaded = self._load_chain(cfg_filename, schema=self)
        except FileNotFoundError:
            raise ConfigError(f"Config file not found: {cfg_filename}") from None
        except IsADirectoryError:
            raise ConfigError(f"Config file {cfg_filename} is a folder") from None
        if loaded:
            self._merge_checked(self._node_from_dict(loaded, cfg_filename), _leaf_keys(loaded),
                                cfg_filename)

    def merge_from_list(self, cfg_list):
        cfg_list = list(cfg_list)
        if len(cfg_list) % 2 != 0:
            raise ConfigError(
                f"Overrides must be KEY VALUE pairs; got an odd number of items: {cfg_list}"
            )
        self._check_known(cfg_list[0::2], "command-line overrides")
        try:
            super().merge_from_list(cfg_list)
        except (ValueError, KeyError, AssertionError) as e:
            raise ConfigError(f"command-line override: {_one_line(e)}") from None
        self._check_finite(cfg_list[0::2], "command-line override")


def get_cfg() -> CfgNode:
    """A copy of the documented defaults (detector/config/defaults.py)."""
    from .defaults import _C

    return _C.clone()
