"""Experiment configs: load a config file and apply command-line overrides.

A config file is a Python file with a ``get_config()`` function that returns an
``ml_collections.ConfigDict`` (the big_vision convention). ``get_config`` may take one string
argument, passed as ``--config path/to/file.py:arg``. The config's *name* is the file's stem
(``configs/offline_8task.py`` -> ``offline_8task``); it names the default run directory.

Overrides follow ml_collections' ``config_flags``: ``--config.quant.bits=3`` (or
``--config.quant.bits 3``). A value is parsed against the type of the value it replaces:

- bool: ``true/false``, ``1/0``, ``yes/no`` (any case);
- int, float, str: the Python constructor (an int is accepted where a float is);
- tuple / list: a Python literal (``"(4,3)"``) or comma-separated items (``4,3``), each
  item parsed against the type of the existing first item;
- None (or an ``ml_collections`` placeholder): a Python literal if one parses, else the string.

An unknown key or a value of the wrong type raises :class:`ConfigError` with a one-line
message (naming close matches for an unknown key).

Every loaded config gets the run-wide keys every pipeline understands (:func:`add_defaults`), so
``--config.eval.limit=N``, ``--config.calib.n_per_task=N``, ``--config.run.mesh=auto`` and
``--config.run.resume=true`` work for every config file without each one spelling them out.

Companion configs (``run.companions``): ``epmq run`` runs each after the config itself, in the
same process, into ``WORKDIR/<companion name>/``. :func:`companion_specs` resolves the entries
against the file the config was loaded from (``run.source``, set by :func:`load_config`) and
:func:`load_companion` loads one with the loading config's ``run`` section.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

OVERRIDE_PREFIX = "--config."


class ConfigError(ValueError):
    """A config file that cannot be loaded, or an override that does not fit the config."""


def config_name(path: str | Path) -> str:
    """The config's name: the stem of its file (``configs/offline_8task.py:tiny`` -> ``offline_8task``)."""
    return Path(str(path).split(":", 1)[0]).stem


def load_config(spec: str | Path) -> ml_collections.ConfigDict:
    """Loads ``get_config()`` from a Python config file.

    Args:
      spec: ``"path/to/file.py"`` or ``"path/to/file.py:arg"`` (then ``get_config(arg)`` is called).

    Returns:
      The ConfigDict, with ``name`` set to the file's stem if the config has no ``name`` of its own.

    Raises:
      ConfigError: the file does not exist, does not define ``get_config``, or it does not
        return a ConfigDict.
    """
    path_s, _, arg = str(spec).partition(":")
    path = Path(path_s)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path_s}")
    module_spec = importlib.util.spec_from_file_location(f"_epmq_config_{path.stem}", path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"config file is not a Python file: {path_s}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    get_config = getattr(module, "get_config", None)
    if get_config is None:
        raise ConfigError(f"config file {path_s} defines no get_config()")
    cfg = get_config(arg) if arg else get_config()
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(
            f"get_config() in {path_s} returned {type(cfg).__name__}, expected ml_collections.ConfigDict")
    if "name" not in cfg:
        cfg.name = path.stem
    cfg = add_defaults(cfg)
    with cfg.run.unlocked():   # where this config came from: run.companions are resolved against it
        cfg.run.source = f"{path.resolve()}:{arg}" if arg else str(path.resolve())
    return cfg


def _defaults() -> dict[str, dict[str, Any]]:
    from ml_collections.config_dict import placeholder

    return {
        "run": {
            # "" (one device), "auto" (every device on one axis "data") or "NAME:SIZE"
            # (e.g. "data:4"): calibration batches and solves are sharded over that axis
            "mesh": "",
            # save calibration progress after every block under WORKDIR/resume and skip the rows
            # a previous run of the same config finished
            "resume": False,
            # trained models, prepared data and XLA compilations ("" = WORKDIR/cache)
            "cache_dir": "",
            # companion configs "PATH[:ARG]" that `epmq run` runs after this one, in the same
            # process, each into WORKDIR/<its name>/ (companion_specs; a companion has none)
            "companions": (),
            # the "PATH[:ARG]" this config was loaded from (load_config sets it; "" if built in code)
            "source": "",
        },
        "eval": {"batch_size": 256, "progress": True, "limit": placeholder(int)},
        # damp_center: what the solve's damping (size quant.damp) pulls toward: "merged" or "zero"
        "calib": {"n_per_task": 128, "seed": 0, "batch_size": 32, "damp_center": "merged"},
    }


def add_defaults(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Adds the run-wide keys (``run.mesh``, ``run.resume``, ``run.cache_dir``,
    ``run.companions``, ``run.source``, ``eval.limit``,
    ``eval.batch_size``, ``eval.progress``, ``calib.n_per_task``, ``calib.seed``,
    ``calib.batch_size``, ``calib.damp_center``) where the config does not set them; returns
    ``cfg`` (changed in place)."""
    with cfg.unlocked():
        for section, values in _defaults().items():
            if section not in cfg:
                cfg[section] = ml_collections.ConfigDict()
            node = cfg[section]
            if not isinstance(node, ml_collections.ConfigDict):
                raise ConfigError(f"config key {section!r} must be a section (ConfigDict), got "
                                  f"{type(node).__name__}")
            with node.unlocked():
                for key, value in values.items():
                    if key not in node:
                        node[key] = value
    return cfg


#: ``run`` keys a companion does not take from the config that runs it (its own are kept).
COMPANION_OWN_RUN_KEYS = ("companions", "source")


def companion_specs(cfg: ml_collections.ConfigDict) -> list[str]:
    """``run.companions`` as ``"ABSOLUTE_PATH[:ARG]"`` specs, in order.

    A relative path is looked up first in the directory of the file ``cfg`` was loaded from
    (``run.source``), then in the working directory. An entry without ``:ARG`` gets the argument
    ``cfg`` was loaded with (``offline_8task.py:tiny`` lists ``offline_8task_broad.py``, which is
    loaded as ``offline_8task_broad.py:tiny``); ``PATH:`` (an empty argument) calls
    ``get_config()`` without one. Nothing is loaded here.
    """
    source = cfg.run.get("source") or ""
    source_path, _, source_arg = source.partition(":")
    here = [Path(source_path).parent] if source_path else []
    out = []
    for entry in cfg.run.get("companions") or ():
        path_s, sep, arg = str(entry).partition(":")
        path = Path(path_s)
        if not path.is_absolute():
            candidates = [d / path for d in here] + [Path.cwd() / path]
            path = next((p for p in candidates if p.is_file()), candidates[0])
        arg = arg if sep else source_arg
        out.append(f"{path}:{arg}" if arg else str(path))
    return out


def load_companion(cfg: ml_collections.ConfigDict, spec: str) -> ml_collections.ConfigDict:
    """Loads the companion ``spec`` (from :func:`companion_specs`) of ``cfg``.

    The companion keeps its own ``run.companions`` and ``run.source`` and takes every other
    ``run`` key from ``cfg`` (``run.mesh``, ``run.resume``, ``run.cache_dir``, ...): the command
    line's ``--config.run.*`` overrides reach the whole job. Its other sections are its file's.

    Raises:
      ConfigError: the file is missing or not a config, or its ``get_config`` rejects the
        argument (one line naming ``run.companions``).
    """
    try:
        companion = load_config(spec)
    except ConfigError as e:
        hint = (" (a relative path is looked up next to the config file that lists it, then in the working "
                "directory)" if str(e).startswith("config file not found") else "")
        raise ConfigError(f"--config.run.companions: {e}{hint}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--config.run.companions: get_config() of {spec} failed: "
                          f"{type(e).__name__}: {e}") from None
    with companion.run.unlocked():
        for key, value in cfg.run.items():
            if key not in COMPANION_OWN_RUN_KEYS:
                companion.run[key] = value
    return companion


def flat_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """All dotted leaf keys of a ConfigDict (sections themselves excluded), in insertion order."""
    out = []
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, ml_collections.ConfigDict):
            out.extend(flat_keys(v, key + "."))
        else:
            out.append(key)
    return out


_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_value(key: str, text: str, like: Any, like_type: type | None = None) -> Any:
    """Parses the command-line string ``text`` as a value of the type of ``like``.

    Args:
      key: the dotted key (for the error message).
      text: the string given on the command line.
      like: the value currently in the config.
      like_type: the declared type when ``like`` is None (an ml_collections placeholder).

    Raises:
      ConfigError: ``text`` cannot be read as that type.
    """
    typ = type(like) if like is not None else like_type
    if typ is None or typ is type(None):
        return _literal(text)
    try:
        if typ is bool:
            low = text.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError
        if typ is int:
            return int(text)
        if typ is float:
            return float(text)
        if typ is str:
            return text
        if typ in (tuple, list):
            parsed = _literal(text)
            if isinstance(parsed, str) or not isinstance(parsed, tuple | list):
                parsed = [p.strip() for p in text.split(",") if p.strip()] if text.strip() else []
            if like:
                parsed = [parse_value(key, str(p), like[0]) if isinstance(p, str) else p for p in parsed]
                item_t = type(like[0])
                bad = [p for p in parsed
                       if not isinstance(p, item_t) and not (item_t is float and isinstance(p, int))]
                if bad:
                    raise ValueError
            return typ(parsed)
    except (ValueError, TypeError):
        raise ConfigError(
            f"--config.{key}={text!r}: expected {typ.__name__}"
            + (f" of {type(like[0]).__name__}" if typ in (tuple, list) and like else "")
            + f" (current value {like!r})") from None
    parsed = _literal(text)
    if not isinstance(parsed, typ):
        raise ConfigError(f"--config.{key}={text!r}: expected {typ.__name__} (current value {like!r})")
    return parsed


def apply_override(cfg: ml_collections.ConfigDict, key: str, text: str) -> None:
    """Sets the dotted ``key`` of ``cfg`` (in place) to ``text`` parsed against the existing value.

    Raises:
      ConfigError: unknown key (the message lists close matches), a key naming a whole section,
        or a value of the wrong type.
    """
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            matches = difflib.get_close_matches(key, flat_keys(cfg), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join('--config.' + m for m in matches)}?" if matches else ""
            raise ConfigError(f"unknown config key --config.{key}{hint}")
        if i < len(parts) - 1:
            node = node[part]
    leaf = parts[-1]
    current = node[leaf]
    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(
            f"--config.{key} is a section, not a value; set one of its keys, e.g. "
            f"--config.{key}.{next(iter(current.keys()), '...')}")
    value = parse_value(key, text, current, node.get_type(leaf))
    with node.unlocked():
        try:
            node[leaf] = value
        except TypeError as e:
            raise ConfigError(f"--config.{key}={text!r}: {e}") from None


def split_override_args(argv: Sequence[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """Separates ``--config.a.b=v`` / ``--config.a.b v`` arguments from the rest.

    Returns:
      ``([(dotted_key, value_text), ...], remaining_args)``.

    Raises:
      ConfigError: an override without a value.
    """
    overrides, rest = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith(OVERRIDE_PREFIX):
            body = arg[len(OVERRIDE_PREFIX):]
            if "=" in body:
                k, v = body.split("=", 1)
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                k, v = body, argv[i + 1]
                i += 1
            else:
                raise ConfigError(f"{arg} needs a value: {arg}=VALUE")
            if not k:
                raise ConfigError(f"{arg}: empty config key")
            overrides.append((k, v))
        else:
            rest.append(arg)
        i += 1
    return overrides, rest


def load_with_overrides(spec: str | Path, overrides: Sequence[tuple[str, str]] = ()) -> ml_collections.ConfigDict:
    """:func:`load_config` followed by :func:`apply_override` for each ``(key, text)``, in order."""
    cfg = load_config(spec)
    for k, v in overrides:
        apply_override(cfg, k, v)
    return cfg
