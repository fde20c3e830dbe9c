"""The config node: fvcore's CfgNode with safe YAML, strict keys and helpful errors."""
import difflib
import logging

import yaml
from fvcore.common.config import CfgNode as _FvCfgNode

__all__ = ["CfgNode", "ConfigError", "get_cfg"]

logger = logging.getLogger(__name__)


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


def _suggest(full_key, valid_keys):
    close = difflib.get_close_matches(full_key, valid_keys, n=1, cutoff=0.5)
    if not close:  # compare the last component only: "SOLVER.BASE_RL" -> "BASE_LR"
        leaf = full_key.split(".")[-1]
        by_leaf = {k.split(".")[-1]: k for k in valid_keys}
        hits = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
        close = [by_leaf[h] for h in hits]
    return f"; did you mean '{close[0]}'?" if close else ""


class CfgNode(_FvCfgNode):
    """fvcore CfgNode whose loading is safe and whose key errors suggest the closest key."""

    def _check_known(self, keys, source):
        valid = _all_keys(self)
        for full_key in keys:
            if full_key not in valid and full_key != "_BASE_":
                raise ConfigError(
                    f"Unknown config key '{full_key}' in {source}{_suggest(full_key, valid)}"
                )

    def merge_from_file(self, cfg_filename, allow_unsafe=False):
        if allow_unsafe:
            raise ConfigError("Unsafe YAML loading is not supported; python tags are rejected")
        try:
            loaded = self.load_yaml_with_base(cfg_filename, allow_unsafe=False)
        except yaml.constructor.ConstructorError as e:
            raise ConfigError(
                f"{cfg_filename}: YAML tag not allowed ({e.problem}); only plain YAML is accepted"
            ) from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{cfg_filename}: malformed YAML: {str(e).splitlines()[0]}") from None
        except FileNotFoundError:
            raise ConfigError(f"Config file not found: {cfg_filename}") from None
        if loaded is None:
            return
        if not isinstance(loaded, dict):
            raise ConfigError(f"{cfg_filename}: top level must be a mapping of config keys")
        loaded = type(self)(loaded)
        self._check_known(_all_keys(loaded), cfg_filename)
        try:
            self.merge_from_other_cfg(loaded)
        except (ValueError, KeyError, AssertionError) as e:
            raise ConfigError(f"{cfg_filename}: {_one_line(e)}") from None

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

    def dump(self, *args, **kwargs):
        return super().dump(*args, **kwargs)


def _one_line(err):
    msg = err.args[0] if err.args else str(err)
    return " ".join(str(msg).split())


def get_cfg() -> CfgNode:
    """A copy of the documented defaults (detector/config/defaults.py)."""
    from .defaults import _C

    return _C.clone()
