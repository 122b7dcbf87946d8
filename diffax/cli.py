"""What the command lines (train.py, sample.py, the studies) share: bad input ends with one line naming the
problem, not a traceback."""
from __future__ import annotations

import difflib
import re
import sys
from typing import Any, Callable, Sequence

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from diffax.train.checkpoint import CheckpointSaveError


def run_reporting_errors(main: Callable[[Sequence[str]], None]) -> Callable[[Sequence[str]], None]:
    """Wrap an absl `main` so ValueError / FileNotFoundError (bad config, missing checkpoint, bad label) and
    FloatingPointError (a run stopped on a NaN loss) and CheckpointSaveError (a full disk) exit with status 1
    and the message alone."""
    def run(argv: Sequence[str]) -> None:
        try:
            main(argv)
        except (ValueError, FileNotFoundError, FloatingPointError, CheckpointSaveError) as e:
            sys.exit(f"error: {e}")
    return run


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's flag parsing, for `app.run(main, flags_parser=parse_flags)`: a bad flag, a config file that
    cannot be loaded, an unknown config key (`--config.train.stepz=5`) or an unparsable override value
    (`--config.train.steps=abc`) exits with status 1 and one line naming it. Config overrides are applied while the flags are parsed, before `main`
    runs, so `run_reporting_errors` cannot see these."""
    try:
        argv = flags.FLAGS(argv)
        for name in flags.FLAGS:
            # A config file that failed to load is a placeholder raising OSError on its first attribute
            # lookup; look one up now. Any other value just lacks the attribute.
            getattr(flags.FLAGS[name].value, "_loaded_config_probe", None)
        return argv
    except OSError as e:
        while e.__cause__ is not None:  # ml_collections wraps the error that stopped the loading
            e = e.__cause__
        sys.exit(f"error: cannot load the config file: {' '.join(str(e).split())}")
    except flags.Error as e:
        # absl: "flag --config.train.steps=abc: invalid literal for int() ..."; name the config key.
        override = re.fullmatch(r"flag --(\w+)\.([\w.]+)=(.*?): (.*)", str(e), re.DOTALL)
        if override:
            name, path, value, reason = override.groups()
            sys.exit(f"error: config key {path!r} (--{name}.{path}={value}): {reason}")
        sys.exit(f"error: {e}")
    except (AttributeError, KeyError):  # ml_collections' lookup of an override's key
        message = _unknown_override(argv)
        if message is None:
            raise
        sys.exit(f"error: {message}")


def _unknown_override(argv: Sequence[str]) -> str | None:
    """'unknown config key ...' for the first `--NAME.a.b=...` argument whose key is not in the config that
    the config-file flag NAME loads; None when every override names a key."""
    for arg in argv[1:]:
        match = re.match(r"--?(\w+)\.([\w.]+)", arg)
        if not match or match.group(1) not in flags.FLAGS:
            continue
        name, path = match.groups()
        config = _load_config(name, argv)
        if config is None:
            continue
        node, parts = config, path.split(".")
        for i, part in enumerate(parts):
            if isinstance(node, ml_collections.ConfigDict) and part in node:
                node = node[part]
                continue
            prefix = ".".join(parts[:i])
            known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            close = difflib.get_close_matches(part, known, n=1)
            hint = (f"did you mean {'.'.join(parts[:i] + close)!r}?" if close else
                    f"known keys in {prefix or 'the config'}: {known}" if known else
                    f"{prefix!r} is a value, not a block of keys")
            return f"unknown config key {'.'.join(parts[:i + 1])!r} ({arg}); {hint}"
    return None


def _load_config(name: str, argv: Sequence[str]) -> ml_collections.ConfigDict | None:
    """The config that the config-file flag `name` loads from `--name=FILE` (or `--name FILE`) in argv."""
    for i, arg in enumerate(argv):
        match = re.fullmatch(rf"--?{name}(?:=(.*))?", arg)
        if match:
            value = match.group(1) if match.group(1) is not None else (argv[i + 1] if i + 1 < len(argv) else None)
            if value is None:
                return None
            config = flags.FLAGS[name].parser.parse(value)
            return config if isinstance(config, ml_collections.ConfigDict) else None
    return None


def run_config_study(run_study: Callable[[ml_collections.ConfigDict], Any],
                     quick_config: Callable[[ml_collections.ConfigDict], ml_collections.ConfigDict],
                     example: str, quick_help: str) -> None:
    """The command line of a study run from one config file: `--config=FILE [--config.key=value ...]
    [--quick]`, where `--quick` runs `quick_config(config)` instead. Its flags are defined here, only when
    the study runs as a program, since the studies import one another."""
    config_flags.DEFINE_config_file("config", None, f"Study file, e.g. {example}.", lock_config=True)
    flags.DEFINE_bool("quick", False, quick_help)
    flags.mark_flags_as_required(["config"])

    def main(argv: Sequence[str]) -> None:
        del argv
        logging.set_verbosity(logging.WARNING)
        config = flags.FLAGS.config
        run_study(quick_config(config) if flags.FLAGS.quick else config)

    app.run(run_reporting_errors(main), flags_parser=parse_flags)
