"""One-line errors for bad `--config.KEY=value` overrides, shared by the entry points.

ml_collections' config_flags raises KeyError / AttributeError (a traceback) from inside
absl's flag parsing when an override names no config key. `run(main)` replaces `app.run(main)`:
it parses the flags itself and turns that into

    error: --config.optimiser.base_lr is not a config key; did you mean --config.optimizer.base_lr?

on stderr with exit code 2 (a usage error, as argparse). Other flag errors keep absl's own
one-line `FATAL Flags parsing error` (exit code 1).
"""

import difflib
import importlib.util
import os
import sys

from absl import app, flags

USAGE_ERROR = 2


def flat_keys(config, prefix='') -> list:
  """Every dotted key of a ConfigDict (nested dicts included, their leaves too)."""
  keys = []
  for key in config.keys():
    value = config[key]
    keys.append(prefix + key)
    if hasattr(value, 'keys') and callable(value.keys):
      keys.extend(flat_keys(value, f'{prefix}{key}.'))
  return keys


def unknown_key_message(key: str, valid_keys, flag: str = 'config') -> str:
  """'--config.KEY is not a config key; did you mean --config.NEAREST?' (the nearest by
  difflib; the sentence stops after 'key' when nothing is close)."""
  message = f'--{flag}.{key} is not a config key'
  nearest = difflib.get_close_matches(key, list(valid_keys), n=1, cutoff=0.5)
  if nearest:
    message += f'; did you mean --{flag}.{nearest[0]}?'
  return message


def _load_config(spec: str):
  """The config `--config=PATH[:preset]` names, loaded as config_flags does (None if it cannot)."""
  path, _, preset = spec.partition(':')
  if not os.path.isfile(path):
    return None
  module_spec = importlib.util.spec_from_file_location('_config_for_errors', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(preset) if preset else module.get_config()


def _overrides(argv, flag: str):
  """Dotted keys of the `--FLAG.KEY[=value]` arguments (also `--noFLAG.KEY` for booleans)."""
  for arg in argv[1:]:
    if arg == '--':
      break
    name = arg.lstrip('-').split('=', 1)[0]
    if name.startswith(f'no{flag}.'):
      name = name[2:]
    if arg.startswith('-') and name.startswith(f'{flag}.'):
      yield name[len(flag) + 1:]


def _has_key(config, key: str) -> bool:
  node = config
  for part in key.split('.'):
    if not hasattr(node, 'keys') or part not in node.keys():
      return False
    node = node[part]
  return True


def _config_spec(argv, flag: str):
  for i, arg in enumerate(argv[1:], 1):
    for prefix in (f'--{flag}=', f'-{flag}='):
      if arg.startswith(prefix):
        return arg[len(prefix):]
    if arg in (f'--{flag}', f'-{flag}') and i + 1 < len(argv):
      return argv[i + 1]
  return None


def bad_override(argv, flag: str = 'config'):
  """The one-line message for the first `--config.KEY` of argv that the config lacks, or None."""
  spec = _config_spec(argv, flag)
  if spec is None:
    return None
  try:
    config = _load_config(spec)
  except Exception:  # pylint: disable=broad-except  (absl reports the config's own errors)
    return None
  if config is None:
    return None
  for key in _overrides(argv, flag):
    if not _has_key(config, key):
      return unknown_key_message(key, flat_keys(config), flag)
  return None


def parse_flags(argv, flag: str = 'config'):
  """absl's flag parsing, with unknown override keys as one line and exit code 2."""
  try:
    return flags.FLAGS(argv)
  except (KeyError, AttributeError) as error:
    message = bad_override(argv, flag)
    if message is None:  # Not an override key: say what was raised, on one line.
      message = ' '.join(str(error).replace('\\n', ' ').split())
    print(f'error: {message}', file=sys.stderr)
    sys.exit(USAGE_ERROR)
  except flags.Error as error:  # As absl's default parser does.
    print(f'FATAL Flags parsing error: {error}', file=sys.stderr)
    print('Pass --helpshort or --helpfull to see help on flags.', file=sys.stderr)
    sys.exit(1)


def run(main, flag: str = 'config'):
  """`app.run(main)` with one-line errors for bad `--config.` keys."""
  app.run(main, flags_parser=lambda argv: parse_flags(argv, flag))
