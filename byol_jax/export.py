"""Command line: `python -m byol_jax.export --workdir=... --out=...` (the library is
byol_jax/runtime/export.py).
"""

import sys

from absl import app, flags

import safetensors.numpy

from byol_jax.core import networks
from byol_jax.runtime import storage
from byol_jax.runtime.export import FORMATS, export_encoder, load_encoder


def _define_flags():
  """Defined only when run as a program: importing this module (evaluation does) must not
  clash with the importer's own --workdir."""
  flags.DEFINE_string('workdir', None, 'Pretraining workdir (reads its checkpoints).')
  flags.DEFINE_string('out', None, 'Output file, e.g. /tmp/encoder.safetensors.')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest readable).')
  flags.DEFINE_enum('format', 'native', FORMATS,
                    'native: Haiku names, for byol_jax (load_encoder, evaluation). torchvision: '
                    'a torchvision ResNet state dict (see docs/checkpoints.md).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  workdir, out, step = flags.FLAGS.workdir, flags.FLAGS.out, flags.FLAGS.step
  format_ = flags.FLAGS.format
  if not workdir or not out:
    sys.exit('error: --workdir and --out are required, e.g. --workdir=/tmp/byol_demo '
             '--out=/tmp/byol_demo_encoder.safetensors')
  if not out.endswith('.safetensors'):
    print(f'note: {out} is written as a .safetensors file whatever its name.', file=sys.stderr)
  try:
    meta = export_encoder(workdir, out, step, format_)
    if format_ == 'native':
      _, params, _ = load_encoder(out)  # Reads back what was written.
      count = networks.param_count(params)
    else:
      with storage.local_file(out) as local:
        arrays = safetensors.numpy.load_file(local)
      count = sum(int(v.size) for k, v in arrays.items()
                  if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked')))
  except (ValueError, OSError) as e:  # OSError covers FileNotFoundError and a full disk.
    sys.exit(f'error: {e}')
  kind = ' (torchvision layout)' if format_ == 'torchvision' else ''
  print(f'Exported the online encoder ({meta["model"]["encoder"]}, {count:,} parameters) of '
        f'step {meta["step"]} to {out}{kind}.')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
