"""Configuration: `load_config(path) -> Config`, TOML (`tomllib`) into validated frozen dataclasses.

Loading never logs and never exits; every problem is a `ConfigError` whose one-line message names
the file, the key and the reason (`config.toml: connectors.github.token_url: must be an https URL`).
No secrets live in the file. `config_from_mapping` is the pure validator behind `load_config`;
`default_config_path`, `default_socket_path` and `default_state_dir` give the places used when
neither the file nor a flag names one. Users and groups in `allow` are resolved at load.

The package: `types` holds the dataclasses, `values` the value parsers and the table walker,
`parse` the per-section builders and the loader; this module is the public face.
"""

from tokend.config.parse import config_from_mapping, load_config
from tokend.config.types import (
    AlertSettings,
    AllowRule,
    ClientAuth,
    Config,
    ConnectorConfig,
    DaemonSettings,
    RedirectHost,
    RefreshSettings,
)
from tokend.config.values import (
    is_loopback_host,
    module_available,
    parse_duration,
    resolve_allow,
)

# The default places live in `paths` (light, for client commands); exported for config's callers.
from tokend.paths import default_config_path, default_socket_path, default_state_dir

__all__ = [
    "AlertSettings",
    "AllowRule",
    "ClientAuth",
    "Config",
    "ConnectorConfig",
    "DaemonSettings",
    "RedirectHost",
    "RefreshSettings",
    "config_from_mapping",
    "default_config_path",
    "default_socket_path",
    "default_state_dir",
    "is_loopback_host",
    "load_config",
    "module_available",
    "parse_duration",
    "resolve_allow",
]
