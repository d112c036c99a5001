"""The ``--config`` flags of ``resflax train`` and ``resflax import``: an ml-collections experiment file with
``--config.KEY=VALUE`` overrides parsed by absl, its errors as one line (``BadInput``), and ``resflax train
--help`` (every key from ``resflax.configs.KEYS``). absl and ml-collections are imported by these functions
only, so the other commands start without them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from resflax.errors import BadInput

TRAIN_USAGE = """usage: resflax train --config=FILE[:ARG] --workdir=DIR [--config.KEY=VALUE ...] [--start_over]

Trains (or resumes: rerun the same command) the run in DIR. FILE[:ARG] is an experiment config, e.g.
experiments/cifar10.py:resnet110,seed=3,val_examples=5000,schedule_scale=0.1; every key below can be
overridden with --config.KEY=VALUE (a misspelt key is an error).

  --config       experiment config file and its argument
  --workdir      run directory: checkpoints/, metrics.jsonl, tb/, config.json
  --start_over   move an existing run in DIR aside (DIR.old-<time>) and start fresh
"""

_KEY_LINE = re.compile(r"^\s*c\.(\w+(?:\.\w+)*)\s*=.*?#\s*(.*)$")


def key_help(path: Path) -> dict[str, str]:
    """The trailing comment of each ``c.KEY = ...  # comment`` line of a config file: the help of keys that
    ``resflax.configs.KEYS`` does not define (a config file of one's own)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    return {m.group(1): m.group(2) for ln in lines if (m := _KEY_LINE.match(ln))}


def print_keys(values: dict[str, Any], helps: dict[str, str], width: int = 0) -> None:
    width = width or max((len(k) for k in values), default=0)
    for key, value in values.items():
        note = f"  # {helps[key]}" if helps.get(key) else ""
        print(f"  --config.{key:<{width}} = {value!r}{note}")


def train_help(argv: list[str]) -> int:
    """``resflax train --help``: the keys of ``--config``'s experiment with its values, or (without it) every
    key of ``resflax.configs.KEYS`` with the base defaults, by experiment."""
    # start-up time: only `train`/`import` parse config flags (absl, ml_collections)
    from absl import flags  # noqa: PLC0415
    from ml_collections import config_flags  # noqa: PLC0415

    from resflax import configs  # noqa: PLC0415 (start-up time, as above)

    print(TRAIN_USAGE)
    helps = {k.name: k.help for k in configs.KEYS.values()}
    spec = next((configs.experiment_path(a.split("=", 1)[1]) for a in argv if a.startswith("--config=")), None)
    if spec is None:
        print("config keys with the base config's defaults (resflax.configs.KEYS); an experiment overrides some\n"
              "(ImageNet's batch_size is 256, ...): `resflax train --help --config=FILE[:ARG]` lists the keys of\n"
              "an experiment with its values.\n\nevery experiment's:")
        width = max(len(k) for k in configs.KEYS)
        print_keys({k.name: k.default for k in configs.keys_of(None) if k.only is None}, helps, width)
        for name, path in configs.EXPERIMENTS.items():
            print(f"\nonly in {path} (resflax train --help --config={path}):")
            print_keys({k.name: k.default for k in configs.keys_of(None) if k.only == name}, helps, width)
        return 0
    path = Path(spec.split(":", 1)[0])
    fl = flags.FlagValues()
    argv0 = ["resflax train", f"--config={spec}"]
    config_flags.DEFINE_config_file("config", None, "", lock_config=True, flag_values=fl, sys_argv=argv0)
    try:
        fl(argv0)
        config = fl.config.to_dict()
    except Exception as e:  # noqa: BLE001 (help must not crash on a broken config)
        raise BadInput(f"cannot load config {spec}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None
    print(f"config keys of {spec} (default values):")
    flat = {}
    for key, value in config.items():  # nested groups (population) as population.seeds, ...
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    print_keys(flat, {**key_help(path), **helps})
    return 0


def parse_config(prog: str, argv: list[str], define) -> tuple[Any, list[str]]:
    """absl flags with an ml-collections ``--config`` file (and ``--config.KEY=VALUE`` overrides) plus the
    flags ``define(fl)`` adds; returns (flag values, positional arguments). Bad flags or a config that does
    not load raise ``BadInput`` with one line."""
    # start-up time: only `train`/`import` parse config flags (absl, ml_collections)
    from absl import flags  # noqa: PLC0415
    from ml_collections import config_flags  # noqa: PLC0415

    fl = flags.FlagValues()
    from resflax import configs  # noqa: PLC0415 (start-up time, as above)

    # a shipped experiment is found from any folder (configs.experiment_path)
    argv = [f"--config={configs.experiment_path(a.split('=', 1)[1])}" if a.startswith("--config=") else a
            for a in argv]
    full_argv = [prog, *argv]
    # sys_argv: the --config.KEY overrides are read from this argv, not from sys.argv, so that
    # main(["train", ..., "--config.batch_size=16"]) works from Python.
    config_flags.DEFINE_config_file("config", None, "experiment config file[:arg]", lock_config=True, flag_values=fl,
                                    sys_argv=full_argv)
    define(fl)
    try:
        rest = fl(full_argv)
        if fl.config is not None:
            fl.config.to_dict()  # a config file that failed to load raises on first use
    except flags.Error as e:
        raise BadInput(str(e).splitlines()[0]) from None
    except OSError as e:  # the config file is missing or unreadable: name it
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise BadInput(f"bad config: {next((ln for ln in lines if 'Errno' in ln), lines[0] if lines else e)}") from None
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        raise BadInput(unknown_key(e, argv) or
                       f"bad config: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return fl, rest[1:]


def given_keys(fl) -> frozenset[str]:
    """The config keys the command line set: ``--config.KEY=VALUE`` overrides, and the ``key=value`` settings of
    ``--config=FILE:ARG`` named like the config key they set (``experiments/imagenet.py:resnet34,shortcut=A``).
    What the experiment file chose by itself is not among them: ``resflax import`` tells a user's explicit
    choice from a default with it."""
    from ml_collections import config_flags  # noqa: PLC0415 (start-up time, as above)

    from resflax import configs  # noqa: PLC0415 (start-up time, as above)

    spec = config_flags.get_config_filename(fl["config"]) if fl["config"].present else ""
    arg = spec.partition(":")[2]
    tokens = {t.split("=", 1)[0].strip() for t in arg.split(",") if "=" in t}
    return frozenset(config_flags.get_override_values(fl["config"])) | (tokens & set(configs.KEYS))


_NO_KEY = re.compile(r"""^'(?P<key>[^']+)'(?:\nDid you mean "(?P<near>[^"]+)" instead of "[^"]+"\?)?$""")


def unknown_key(err: Exception, argv: list[str]) -> str | None:
    """One line for a ``--config.KEY=VALUE`` whose KEY the config lacks (ml-collections' KeyError names the
    missing part, with a close match on a second line), naming the whole key and the close match; None for
    any other error."""
    if isinstance(err, AttributeError) and err.args and isinstance(err.args[0], KeyError):
        err = err.args[0]  # ConfigDict's attribute access wraps the KeyError
    text = err.args[0] if isinstance(err, KeyError) and err.args else None
    m = _NO_KEY.match(text) if isinstance(text, str) else None
    if m is None:
        return None
    for a in argv:
        if not a.startswith("--config."):
            continue
        parts = a[len("--config."):].split("=", 1)[0].split(".")
        if m["key"] in parts:
            i = parts.index(m["key"])
            key = ".".join(parts)
            near = f" (did you mean {'.'.join([*parts[:i], m['near'], *parts[i + 1:]])!r}?)" if m["near"] else ""
            return f"unknown config key {key!r}{near}"
    return None
