"""Command line: `python -m byol_jax.reference_checkpoint --pkl=... --config=... --workdir=...`
(the library is byol_jax/runtime/reference_checkpoint.py).
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from byol_jax.runtime import checkpointing, storage
from byol_jax.runtime.checkpointing import one_line
from byol_jax.runtime.reference_checkpoint import write_workdir


def _define_flags():
  """Defined only when run as a program, like export.py (importers keep their own flags)."""
  flags.DEFINE_string('pkl', None, 'The reference checkpoint (pretrain.pkl).')
  config_flags.DEFINE_config_file('config', None, 'Pretraining config (configs/byol.py).',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'New workdir for the converted checkpoint.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  pkl, config, workdir = flags.FLAGS.pkl, flags.FLAGS.config, flags.FLAGS.workdir
  if not pkl or config is None or not workdir:
    sys.exit('error: --pkl, --config and --workdir are required, e.g. --pkl=pretrain.pkl '
             '--config=configs/byol.py --workdir=/tmp/byol_reference')
  try:
    step = write_workdir(pkl, config, workdir)
  except (ValueError, OSError) as e:  # OSError covers FileNotFoundError and a full disk.
    sys.exit(f'error: {one_line(e, 1000)}')
  if 0 < config.max_steps <= step:
    print(f'note: the checkpoint is at step {step} and max_steps={config.max_steps}: main_loop '
          f'has nothing left to train (export and evaluation read it as it is).', flush=True)
  where = storage.join(workdir, checkpointing.CHECKPOINT_DIR, str(step))
  print(f'Wrote {pkl} (reference step {step}) to {where}. Resume with python -m '
        f'byol_jax.main_loop and the same --config and overrides; export with python -m '
        f'byol_jax.export --workdir={workdir} --out=encoder.npz.', flush=True)


if __name__ == '__main__':
  _define_flags()
  from byol_jax.runtime import config_errors  # One line for a bad --config. key.
  config_errors.run(main)
