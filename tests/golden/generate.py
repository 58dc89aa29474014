"""Generate golden files from DeepMind's original BYOL code (the "reference").

What this is
------------
This script imports the reference implementation (DeepMind's `byol` package,
Apache-2.0, kept outside this repository), calls the reference's own functions
on fixed, seeded inputs and writes the results as small `.npz` files (plus one
pickle) next to this script, in `tests/golden/`. The project's tests load these
files and check that `byol_jax` reproduces the reference numbers. Nothing from
the reference is copied into the project: it is imported from
`--reference=PATH` at generation time only. The package `byol_jax` is never
imported here.

Run (from the repository root)::

    python tests/golden/generate.py [--reference=../shared/reference] [--out=tests/golden]

`--reference` is the folder that CONTAINS `byol/` (default: `../shared/reference`
relative to the repository root). The script forces `JAX_PLATFORMS=cpu` and a
single host CPU device (it strips any `--xla_force_host_platform_device_count`
from `XLA_FLAGS`), because the reference's eval loss divides by
`jax.device_count()`. Everything is float32. The output is deterministic: two
runs write byte-identical files (the .npz writer fixes the zip timestamps;
the files are deflate-compressed npz archives that `np.load` reads as usual).
One line per file is printed with its size, then the total and the run time
(about 2-3.5 min on 2 CPU cores, most of it the ResNet-50 init).

Shims (installed before the reference is imported; the reference is not edited)
------------------------------------------------------------------------------
The reference was written for JAX ~0.2 (2020). On the installed JAX/Haiku:

* `jax.tree_multimap`, `jax.tree_map` were removed -> both alias
  `jax.tree_util.tree_map`.
* `jax.api.device_put_sharded` (used by `helpers.bcast_local_devices`) was
  removed, and so was `jax.device_put_sharded` -> `jax.api` is a namespace
  whose `device_put_sharded(xs, devices)` stacks `xs` on a new leading axis and
  shards that axis over `devices` with a `NamedSharding`.
* `jax.host_id` / `jax.host_count` are set to `jax.process_index` /
  `jax.process_count` (where the old names survive they are deprecated
  aliases that warn on every call).
* `acme` is not installed: stub modules `acme`, `acme.jax`, `acme.jax.utils`
  whose `prefetch(it)` returns `it` (only used by the data pipelines, which the
  script never runs).
* `dill` is not installed: a stub module `dill` whose `dump`/`load` are
  `pickle.dump`/`pickle.load` (the checkpoints hold only plain data, dicts,
  NamedTuples and arrays, which pickle handles).
* `tree` (dm-tree) is used for `map_structure_with_path` by the LARS filter; if
  it is missing, a stub with a dict/list/tuple/NamedTuple implementation is
  installed.
* `byol.utils.augmentations.postprocess` is replaced by the identity
  `lambda inputs, rng: inputs` while the BYOL update runs (file 3), so the
  update sees exactly the stored views. The augmentation functions themselves
  are exercised separately with explicit parameters (file 6).
* The ImageNet pipelines (`dataset.load`) are never run: the random-resized-
  crop and centre-crop window samplers are called directly on JPEG bytes, with
  the `decode_and_crop_jpeg` ops replaced by a recorder (file 7).

Flattening convention for Haiku trees
-------------------------------------
A Haiku params/state dict `{module: {name: array}}` is stored under npz keys
`f'{prefix}::{module}::{name}'`, with the module path exactly as the reference
builds it, e.g. `online_params::tiny_res_net/~/block_group_0/~/block_0/~/conv_0::w`.
LARS momentum trees (`ScaleByLarsState.mu`) use the same convention with prefix
`opt_mu`. All arrays are stored WITHOUT a device axis (the leading pmap axis of
size 1 is stripped). Haiku BatchNorm state lives in modules ending in
`/~/mean_ema` and `/~/var_ema` with names `counter` (int32), `hidden`,
`average`.

Common network config "TINY"
----------------------------
`byol.byol_experiment.ByolExperiment` with encoder_class='TinyResNet',
encoder_config=dict(resnet_v2=False, width_multiplier=1), projector
32 -> 16, predictor 32 -> 16, num_classes=10, bn_config=dict(decay_rate=.9,
eps=1e-5, cross_replica_axis='i', create_scale=True, create_offset=True)
(cross_replica_axis=None where the forward is called outside pmap; with one
device the two are numerically the same), checkpointing disabled,
random_seed=0, enable_double_transpose=False,
evaluation_config=dict(subset='test', batch_size=4).

Files
-----
1. `tiny_network.npz` -- TINY network at initialisation.
   `images` [4,32,32,3] U[0,1) (RandomState(0)); `view2 = images[:, :, ::-1]`
   (horizontal flip). Initial state: `ByolExperiment._make_initial_state(
   rng=PRNGKey(0), dummy_input={'view1': images, 'view2': view2, 'labels':
   zeros int32 [4]})` called DIRECTLY (unmapped, no device axis) on an
   experiment built with cross_replica_axis=None. Keys: `images`, `view2`,
   `labels`, `online_params::*`, `target_params::*`, `online_state::*`,
   `target_state::*` (BatchNorm state at init: `counter` 0, `hidden` 0,
   `average` NON-zero, see file 3). Training-mode forward of the
   online net (`forward.apply(online_params, online_state, inputs={view1,
   view2, labels}, is_training=True)`): `train_out::{projection,prediction,
   logits}_view1`, `train_out::{projection,prediction,logits}_view2` and the
   updated BatchNorm state `train_state::*` (the views go through the SAME
   BatchNorm modules one after the other, view1 then view2, so every EMA is
   updated twice: `counter` 2). Eval-mode forward with the INITIAL
   online state (`inputs={'images': images}, is_training=False`):
   `eval_out::projection`, `eval_out::prediction`, `eval_out::logits`.

2. `resnet50_init.npz` -- same procedure with encoder_class='ResNet50',
   projector 4096 -> 256, predictor 4096 -> 256, num_classes=1000, images
   [4,64,64,3] (RandomState(1)), view2 = images[:, :, ::-1] as above (not
   stored; recompute it). For every leaf of
   `online_params` and `online_state`: `{prefix}::{module}::{name}::sum`
   (float64 sum), `::sumsq` (float64 sum of squares), `::first` (first 16
   values of the flattened array as float32; fewer if the leaf is smaller),
   `::shape` (int64). Also `encoder_param_count` (int64 scalar: number of
   online parameters in modules under `res_net50`, 23,508,032), `images`,
   and the training-mode forward outputs `train_out::projection_view1`,
   `train_out::prediction_view1`, `train_out::logits_view1` (plus the three
   `_view2` ones). BatchNorm runs with batch statistics of the 4 images.

3. `update.npz` -- the full reference BYOL update (`ByolExperiment.update_pmap`
   with the identity `postprocess`), TINY, batch_size=8, max_steps=10,
   base_target_ema=0.99, optimizer_config=dict(weight_decay=1.5e-6, eta=1e-3,
   momentum=0.9), lr_schedule_config=dict(base_learning_rate=2.0,
   warmup_steps=2). Initial state: `jax.pmap(_make_initial_state)` over one
   device with PRNGKey(0) and the step-0 batch as dummy input. Six steps;
   step k (k=0..5) uses `inputs.update_batch(k)` (tests/golden/inputs.py: views
   [8,32,32,3] U[0,1) from RandomState(100+k), labels int32 in [0,10); not stored,
   the tests rebuild them) and
   global_step=k (the rng given to the step is PRNGKey(k); unused because
   postprocess is the identity). Keys: `init_online_params::*`,
   `init_target_params::*`, `init_online_state::*`, `init_target_state::*`
   (the initial LARS momentum is all zeros and is not stored). The init
   PARAMS equal file 1's (same rng; parameter init does not depend on the
   batch) but the init STATE does not: Haiku's `init` runs the training
   forward, and each BatchNorm EMA's `average` (created by its first
   `set_state`) already holds a non-zero value from that forward ((1 - decay)
   times a dummy-batch statistic), while `counter` and `hidden` stay 0. So the initial BN state depends on the dummy
   batch (here the step-0 batch). Per-step logs, float32
   arrays of length 6: `logs::loss`,
   `logs::repr_loss`, `logs::classif_loss`, `logs::top1_accuracy`,
   `logs::top5_accuracy`, `logs::learning_rate`, `logs::tau` (values used BY
   step k); final state after the 6 steps: `online_params::*`,
   `target_params::*`, `online_state::*`, `target_state::*`, `opt_mu::*`.
   The state after step k=1 (i.e. after TWO updates, k=0 and k=1) with the
   same five prefixes behind `after1_`: `after1_online_params::*`,
   `after1_target_params::*`, `after1_online_state::*`,
   `after1_target_state::*`, `after1_opt_mu::*`. Note step k=0 has learning
   rate 0 (warm-up), so it leaves the online params unchanged but moves the
   target params (tau), the LARS momentum and the BatchNorm state; step k=1
   is the first one that moves the online params.

4. `loss.npz` -- `byol.utils.helpers.regression_loss(x, y)`: `x`, `y` [6,16]
   float32 normal (RandomState(2); x then y drawn), row 4 of x set to zeros,
   row 5 of y multiplied by 1e-7; `out` [6]. (The reference L2-normalises with
   `x * rsqrt(max(sum(x**2), 1e-12))`.)

5. `schedules.npz` -- `steps` int32 arange(0, 25); `learning_rate` =
   `schedules.learning_schedule(steps, batch_size=512, base_learning_rate=0.3,
   total_steps=20, warmup_steps=5)`; `tau` = `schedules.target_ema(steps,
   base_ema=0.99, max_steps=20)`. Both float32.

6. `augment_ops.npz` -- the reference's deterministic colour/blur/solarize
   functions from `byol/utils/augmentations.py`, with explicit parameters,
   applied per image (one parameter per image, via `jax.vmap`) to `images`
   [4,32,32,3] U[0,1) (RandomState(3)); parameters drawn from RandomState(30).
   Keys: `images`; `brightness::delta` [4], `brightness::out`;
   `contrast::factor` [4], `contrast::out`; `saturation::factor` [4] (image 0
   uses 2.5 so S saturates), `saturation::out`; `hue::delta` [4] (image 0 uses
   0.45), `hue::out`; `grayscale::out`; `blur::sigma` [4],
   `blur::kernel_size` (3.2), `blur::effective_kernel_size` (3), `blur::out`;
   `blur64::images` [2,64,64,3], `blur64::sigma` [2], `blur64::kernel_size`
   (23), `blur64::out`; `solarize::threshold` (0.5), `solarize::out`;
   `flip::key`, `flip::flipped` [4] bool, `flip::out`. Semantics per op (one
   sentence each; which reference function produced it):
     brightness -- `adjust_brightness(rgb_tuple, delta)`: out = x + delta,
       one scalar delta per image, NOT clipped (the reference jitter pipeline
       clips to [0, 1] after each colour op, outside this function).
     contrast -- `adjust_contrast(rgb_tuple, factor)`: per image and PER
       CHANNEL, out = factor * (c - mean_hw(c)) + mean_hw(c) with the mean of
       that channel over H and W (not a grayscale mean), NOT clipped.
     saturation -- `hsv_to_rgb(*adjust_saturation(*rgb_to_hsv(r, g, b),
       factor))`: S multiplied by factor then clipped to [0, 1] (only S is
       clipped; the RGB result is not), one factor per image.
     hue -- `hsv_to_rgb(*adjust_hue(*rgb_to_hsv(r, g, b), delta))`:
       H = (H + delta) mod 1, one delta per image; RGB result not clipped.
     grayscale -- `_to_grayscale(image)`: y = 0.2989 R + 0.5870 G +
       0.1140 B, tiled back to 3 channels, no clipping.
     blur -- `_gaussian_blur_single_image(image, kernel_size, 'SAME',
       sigma)`: radius = int(kernel_size / 2), taps exp(-x^2 / (2 sigma^2))
       for integer x in [-radius, radius] normalised to sum 1, separable
       depthwise conv (horizontal then vertical) with ZERO padding ('SAME'),
       one sigma per image; kernel_size is the float the reference's
       `gaussian_blur` passes, H / blur_divider = 32 / 10 = 3.2 -> 3 taps.
     blur64 -- the same function on two 64 px images (RandomState(5)) with
       kernel_size = 23 (radius 11, 23 taps), one sigma per image.
     solarize -- `solarize(images, rng, threshold=0.5, apply_prob=1.0)`
       (apply_prob 1 -> every image): out = where(x < 0.5, x, 1 - x).
     flip -- `random_flip(images, PRNGKey(3))`: each image is either
       unchanged or reversed along the WIDTH axis (jnp.fliplr on HWC), per
       image with probability 0.5; `flip::flipped` records which.

7. `crop_windows.npz` -- windows drawn by the reference's random-resized-crop
   sampler `byol.utils.dataset._decode_and_random_crop` on real JPEG bytes of
   48x64 (h x w) and 375x500 pixels: `windows_48x64`, `windows_375x500` int32
   [4000,4] as (offset_h, offset_w, h, w) (tf.random.set_seed(0) and (1)
   before the respective 4000 eager calls); `center_sizes` int32 [6,2] (h, w)
   and `center_windows` int32 [6,4] (offset_h, offset_w, h, w) of
   `_decode_and_center_crop` (crop size int(224/256 * min(h, w)),
   offsets ((H - size) + 1) // 2). The crop sampler in words: area fraction
   s ~ U[0.08, 1), log aspect ratio ~ U[log 3/4, log 4/3), w = round(sqrt(s *
   H * W * r)), h = round(sqrt(s * H * W / r)), each clipped to the image
   size (no retry loop, no fallback), offsets uniform in [0, W - w] and
   [0, H - h].

8. `linear_eval.npz` -- `byol.eval_experiment.EvalExperiment.update_pmap`,
   TinyResNet backbone (bn_decay_rate=0.9, i.e. bn_config={'decay_rate': 0.9},
   eps 1e-5, no cross-replica axis), num_classes=10, batch_size=8,
   max_steps=10, optimizer `optax.sgd(lr, momentum=0.9, nesterov=True)`,
   lr_schedule_config=dict(base_learning_rate=0.2, warmup_steps=0).
   Backbone params/state = file 1's `online_params`/`online_state` restricted
   to the `tiny_res_net*` modules (`backbone_params::*`, `backbone_state::*`).
   Classifier initialised by `jax.pmap(_make_initial_state)` with PRNGKey(0)
   and the step-0 batch as dummy input (`init_classif::linear::{w,b}`); as in
   the reference's `_initialize_train`, the backbone optimiser state is set
   to None when the backbone is frozen. Three steps with `steps::{k}::images`
   [8,32,32,3] U[0,1) (RandomState(200+k)), `steps::{k}::labels` int32 in
   [0,10), global_step=k. freeze_backbone=True (linear eval; backbone runs in
   eval mode and is not updated): `classif::*` after 3 steps, `train_loss` [3],
   `classif_trace::*` (SGD momentum buffer). freeze_backbone=False
   (fine-tuning, backbone in training mode, same start): `ft_classif::*`,
   `ft_backbone_params::*`, `ft_backbone_state::*`, `ft_train_loss` [3],
   `ft_classif_trace::*`.

9. `reference_pretrain_tiny.pkl` + `reference_pretrain_tiny_embeddings.npz` --
   the final pmapped state of run 3 saved by the reference's own
   `checkpointing.Checkpointer(use_checkpointing=True, checkpoint_dir=TMP,
   save_checkpoint_interval=1, filename='pretrain.pkl').maybe_save_checkpoint(
   state, step=6, rng=PRNGKey(6), is_final=True)` (dill stub = pickle,
   protocol 2), copied here. It is loaded back with
   `checkpointing.load_checkpoint` and the EvalExperiment backbone
   (`forward_backbone.apply(online_params, online_state, {'images': images},
   is_training=False)`, TinyResNet, bn_decay_rate=0.9; the reference passes the
   whole online params dict, projector/predictor/classifier included, and
   Haiku ignores the unused modules) embeds `images` [4,32,32,3] U[0,1)
   (RandomState(4)): `images`, `embeddings` [4,8]. Also `step` (6) and `rng`
   (the stored key, uint32 [2]).
   The pickle is a dict {'experiment_state': _ByolExperimentState(
   online_params, target_params, online_state, target_state, opt_state),
   'step': 6, 'rng': PRNGKey(6)} written with pickle protocol 2; opt_state is
   the tuple (AddWeightDecayState(), ScaleByLarsState(mu), EmptyState()) of
   the LARS chain; all arrays are numpy arrays (the checkpointer device_gets
   the first device's copy) except `rng`, a jax Array. The classes/callables
   it references are listed in PICKLE_GLOBALS below (checked at every run).
"""


import argparse
import io
import os
import pickle
import pickletools
import re
import shutil
import sys
import tempfile
import time
import types
import zipfile

# --- Environment: CPU only, ONE device, quiet TF. Must precede jax import. ---
os.environ['JAX_PLATFORMS'] = 'cpu'
os.environ['XLA_FLAGS'] = re.sub(
    r'--xla_force_host_platform_device_count=\d+', '',
    os.environ.get('XLA_FLAGS', '')).strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

# Everything the GLOBAL opcodes of reference_pretrain_tiny.pkl reference, as
# printed by this script (`pickletools.genops`) with jax 0.10.2, numpy 2.4.6,
# optax 0.2.8; the script warns if a run finds a different set. This is the
# allow-list a safe unpickler needs:
#   _codecs.encode                      -- protocol-2 bytes of array buffers
#   byol.byol_experiment._ByolExperimentState  -- NamedTuple, 5 fields
#   byol.utils.optimizers.AddWeightDecayState  -- empty NamedTuple
#   byol.utils.optimizers.ScaleByLarsState     -- NamedTuple(mu)
#   jax._src.array._reconstruct_array   -- the `rng` jax Array; called as
#       _reconstruct_array(numpy._core.multiarray._reconstruct,
#                          (numpy.ndarray, (0,), b'b'), ndarray_state,
#                          {'weak_type': False})
#   numpy._core.multiarray._reconstruct -- numpy arrays
#   numpy.dtype
#   numpy.ndarray
#   optax._src.base.EmptyState          -- state of optax.scale(-lr)
PICKLE_GLOBALS = (
    '_codecs.encode',
    'byol.byol_experiment._ByolExperimentState',
    'byol.utils.optimizers.AddWeightDecayState',
    'byol.utils.optimizers.ScaleByLarsState',
    'jax._src.array._reconstruct_array',
    'numpy._core.multiarray._reconstruct',
    'numpy.dtype',
    'numpy.ndarray',
    'optax._src.base.EmptyState',
)


# --------------------------------------------------------------------------
# Shims
# --------------------------------------------------------------------------
def install_shims():
  """Makes the 2020 reference importable on the installed JAX stack."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  jax.tree_multimap = jax.tree_util.tree_map
  jax.tree_map = jax.tree_util.tree_map
  # Set unconditionally: where they still exist they are deprecated aliases
  # of the same functions that warn on every call.
  jax.host_id = jax.process_index
  jax.host_count = jax.process_count

  def device_put_sharded(xs, devices):
    stacked = jnp.stack([jnp.asarray(x) for x in xs])
    mesh = jax.sharding.Mesh(np.array(devices), ('d',))
    spec = jax.sharding.PartitionSpec('d')
    return jax.device_put(stacked, jax.sharding.NamedSharding(mesh, spec))

  jax.api = types.SimpleNamespace(
      device_put_sharded=getattr(jax, 'device_put_sharded',
                                 device_put_sharded))

  # acme: only `acme.jax.utils.prefetch` is used (on data iterators).
  acme = types.ModuleType('acme')
  acme_jax = types.ModuleType('acme.jax')
  acme_utils = types.ModuleType('acme.jax.utils')
  acme_utils.prefetch = lambda iterator, *a, **k: iterator
  acme.jax = acme_jax
  acme_jax.utils = acme_utils
  sys.modules.setdefault('acme', acme)
  sys.modules.setdefault('acme.jax', acme_jax)
  sys.modules.setdefault('acme.jax.utils', acme_utils)

  # dill: the checkpointer's dump/load become pickle's.
  try:
    import dill  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    dill = types.ModuleType('dill')
    dill.dump = pickle.dump
    dill.load = pickle.load
    dill.dumps = pickle.dumps
    dill.loads = pickle.loads
    sys.modules['dill'] = dill

  # dm-tree: only map_structure_with_path is used (LARS filters).
  try:
    import tree  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    tree = types.ModuleType('tree')

    def map_structure_with_path(fn, structure, _path=()):
      if isinstance(structure, dict):
        return type(structure)(
            (k, map_structure_with_path(fn, v, _path + (k,)))
            for k, v in sorted(structure.items()))
      if isinstance(structure, tuple) and hasattr(structure, '_fields'):
        return type(structure)(*[
            map_structure_with_path(fn, v, _path + (i,))
            for i, v in enumerate(structure)])
      if isinstance(structure, (list, tuple)):
        return type(structure)(
            map_structure_with_path(fn, v, _path + (i,))
            for i, v in enumerate(structure))
      return fn(_path, structure)

    tree.map_structure_with_path = map_structure_with_path
    sys.modules['tree'] = tree


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------
def flatten(prefix, tree, strip_device_axis=False):
  """{module: {name: arr}} -> {f'{prefix}::{module}::{name}': np.ndarray}."""
  out = {}
  for module in sorted(tree):
    for name in sorted(tree[module]):
      arr = np.asarray(tree[module][name])
      if strip_device_axis:
        assert arr.shape[0] == 1, (prefix, module, name, arr.shape)
        arr = arr[0]
      out[f'{prefix}::{module}::{name}'] = arr
  return out


def stats(prefix, tree):
  """Per-leaf sum / sumsq / first 16 values / shape (for big trees)."""
  out = {}
  for module in sorted(tree):
    for name in sorted(tree[module]):
      arr = np.asarray(tree[module][name])
      a64 = arr.astype(np.float64)
      key = f'{prefix}::{module}::{name}'
      out[key + '::sum'] = np.float64(a64.sum())
      out[key + '::sumsq'] = np.float64((a64 * a64).sum())
      out[key + '::first'] = arr.reshape(-1)[:16].astype(np.float32)
      out[key + '::shape'] = np.array(arr.shape, dtype=np.int64)
  return out


def add_device_axis(tree):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jax.tree_util.tree_map(lambda x: jnp.asarray(x)[None], tree)


def lars_mu(opt_state):
  """The momentum tree of the reference's ScaleByLarsState in a LARS chain."""
  from byol.utils import optimizers  # pylint: disable=g-import-not-at-top
  found = [s for s in opt_state if isinstance(s, optimizers.ScaleByLarsState)]
  assert len(found) == 1, opt_state
  return found[0].mu


def sgd_trace(opt_state):
  """The momentum buffer (optax TraceState.trace) of an optax.sgd state."""
  found = [s for s in opt_state if hasattr(s, 'trace')]
  assert len(found) == 1, opt_state
  return found[0].trace


def tiny_network_config(cross_replica_axis):
  return dict(
      projector_hidden_size=32,
      projector_output_size=16,
      predictor_hidden_size=32,
      encoder_class='TinyResNet',
      encoder_config=dict(resnet_v2=False, width_multiplier=1),
      bn_config={
          'decay_rate': .9,
          'eps': 1e-5,
          'cross_replica_axis': cross_replica_axis,
          'create_scale': True,
          'create_offset': True,
      })


def make_byol_experiment(network_config, num_classes=10, batch_size=4,
                         max_steps=10, base_target_ema=0.99,
                         optimizer_config=None, lr_schedule_config=None):
  from byol import byol_experiment  # pylint: disable=g-import-not-at-top
  return byol_experiment.ByolExperiment(
      random_seed=0,
      num_classes=num_classes,
      batch_size=batch_size,
      max_steps=max_steps,
      enable_double_transpose=False,
      base_target_ema=base_target_ema,
      network_config=network_config,
      optimizer_config=optimizer_config or dict(
          weight_decay=1.5e-6, eta=1e-3, momentum=0.9),
      lr_schedule_config=lr_schedule_config or dict(
          base_learning_rate=2.0, warmup_steps=2),
      evaluation_config=dict(subset='test', batch_size=4),
      checkpointing_config=dict(
          use_checkpointing=False, checkpoint_dir=None,
          save_checkpoint_interval=0, filename='unused.pkl'))


def make_eval_experiment(freeze_backbone):
  from byol import eval_experiment  # pylint: disable=g-import-not-at-top
  return eval_experiment.EvalExperiment(
      random_seed=0,
      num_classes=10,
      batch_size=8,
      max_steps=10,
      enable_double_transpose=False,
      checkpoint_to_evaluate=None,
      allow_train_from_scratch=True,
      freeze_backbone=freeze_backbone,
      network_config=dict(
          encoder_class='TinyResNet',
          encoder_config=dict(resnet_v2=False, width_multiplier=1),
          bn_decay_rate=0.9),
      optimizer_config=dict(momentum=0.9, nesterov=True),
      lr_schedule_config=dict(base_learning_rate=0.2, warmup_steps=0),
      evaluation_config=dict(subset='test', batch_size=4),
      checkpointing_config=dict(
          use_checkpointing=False, checkpoint_dir=None,
          save_checkpoint_interval=0, filename='unused.pkl'))


def uniform_images(seed, shape):
  return np.random.RandomState(seed).uniform(0., 1., size=shape).astype(
      np.float32)


def save(out_dir, name, arrays, report):
  """Writes an .npz (deflated) that `np.load` reads like np.savez_compressed's.

  Unlike np.savez*, every zip member gets a fixed timestamp, so two runs write
  byte-identical files (no spurious git diffs).
  """
  path = os.path.join(out_dir, name)
  with zipfile.ZipFile(path + '_tmp', 'w') as zf:
    for key in sorted(arrays):
      buf = io.BytesIO()
      np.lib.format.write_array(buf, np.asanyarray(arrays[key]),
                                allow_pickle=False)
      info = zipfile.ZipInfo(key + '.npy', date_time=(1980, 1, 1, 0, 0, 0))
      info.compress_type = zipfile.ZIP_DEFLATED
      info.external_attr = 0o644 << 16
      zf.writestr(info, buf.getvalue(), compresslevel=9)
  os.replace(path + '_tmp', path)
  report.append(path)
  return path


# --------------------------------------------------------------------------
# 1 + 2: networks at initialisation
# --------------------------------------------------------------------------
def network_goldens(experiment, images, with_eval=True, full=True):
  """Init (unmapped) + train/eval forwards of the online network."""
  import jax  # pylint: disable=g-import-not-at-top
  view2 = images[:, :, ::-1].copy()
  labels = np.zeros([images.shape[0]], np.int32)
  inputs = {'view1': images, 'view2': view2, 'labels': labels}
  # Called DIRECTLY (no pmap, no device axis); the experiment was built with
  # cross_replica_axis=None.
  state = experiment._make_initial_state(  # pylint: disable=protected-access
      rng=jax.random.PRNGKey(0), dummy_input=inputs)
  train_out, train_state = experiment.forward.apply(
      state.online_params, state.online_state, inputs=inputs,
      is_training=True)
  result = dict(images=images)
  if full:
    result.update(view2=view2, labels=labels)
    result.update(flatten('online_params', state.online_params))
    result.update(flatten('target_params', state.target_params))
    result.update(flatten('online_state', state.online_state))
    result.update(flatten('target_state', state.target_state))
    result.update(flatten('train_state', train_state))
  else:
    result.update(stats('online_params', state.online_params))
    result.update(stats('online_state', state.online_state))
  for k, v in train_out.items():
    result[f'train_out::{k}'] = np.asarray(v)
  if with_eval:
    eval_out, _ = experiment.forward.apply(
        state.online_params, state.online_state, inputs={'images': images},
        is_training=False)
    for k, v in eval_out.items():
      result[f'eval_out::{k}'] = np.asarray(v)
  return result, state


# --------------------------------------------------------------------------
# 3: BYOL update
# --------------------------------------------------------------------------
def update_goldens():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from byol.utils import augmentations  # pylint: disable=g-import-not-at-top
  from byol.utils import helpers  # pylint: disable=g-import-not-at-top

  import inputs  # pylint: disable=g-import-not-at-top (tests/golden/inputs.py, beside this)
  num_steps = inputs.UPDATE_STEPS
  batches = [inputs.update_batch(k) for k in range(num_steps)]

  original_postprocess = augmentations.postprocess
  augmentations.postprocess = lambda inputs, rng: inputs
  try:
    experiment = make_byol_experiment(
        tiny_network_config('i'), num_classes=10, batch_size=8, max_steps=10,
        base_target_ema=0.99,
        optimizer_config=dict(weight_decay=1.5e-6, eta=1e-3, momentum=0.9),
        lr_schedule_config=dict(base_learning_rate=2.0, warmup_steps=2))
    init_fn = jax.pmap(experiment._make_initial_state, axis_name='i')  # pylint: disable=protected-access
    state = init_fn(rng=helpers.bcast_local_devices(jax.random.PRNGKey(0)),
                    dummy_input=add_device_axis(batches[0]))

    result = {}  # The inputs are not stored: tests rebuild them with inputs.update_batch.

    def dump_state(prefix, s, with_mu=True):
      result.update(flatten(prefix + 'online_params', s.online_params, True))
      result.update(flatten(prefix + 'target_params', s.target_params, True))
      result.update(flatten(prefix + 'online_state', s.online_state, True))
      result.update(flatten(prefix + 'target_state', s.target_state, True))
      if with_mu:
        result.update(flatten(prefix + 'opt_mu', lars_mu(s.opt_state), True))

    # The initial LARS momentum is all zeros: not stored.
    dump_state('init_', state, with_mu=False)
    logs = {}
    for k in range(num_steps):
      state, step_logs = experiment.update_pmap(
          state,
          global_step=jnp.full([1], k, jnp.int32),
          rng=helpers.bcast_local_devices(jax.random.PRNGKey(k)),
          inputs=add_device_axis(batches[k]))
      for name, v in step_logs.items():
        logs.setdefault(name, []).append(np.asarray(v)[0])
      if k == 1:
        dump_state('after1_', state)
    dump_state('', state)
    for name, values in logs.items():
      result[f'logs::{name}'] = np.asarray(values, dtype=np.float32)
  finally:
    augmentations.postprocess = original_postprocess
  return result, state


# --------------------------------------------------------------------------
# 4 + 5: loss, schedules
# --------------------------------------------------------------------------
def loss_goldens():
  from byol.utils import helpers  # pylint: disable=g-import-not-at-top
  rs = np.random.RandomState(2)
  x = rs.normal(size=(6, 16)).astype(np.float32)
  y = rs.normal(size=(6, 16)).astype(np.float32)
  x[4] = 0.
  y[5] = y[5] * np.float32(1e-7)
  out = np.asarray(helpers.regression_loss(x, y))
  return dict(x=x, y=y, out=out)


def schedule_goldens():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from byol.utils import schedules  # pylint: disable=g-import-not-at-top
  steps = jnp.arange(0, 25, dtype=jnp.int32)
  lr = schedules.learning_schedule(
      steps, batch_size=512, base_learning_rate=0.3, total_steps=20,
      warmup_steps=5)
  tau = schedules.target_ema(steps, base_ema=0.99, max_steps=20)
  return dict(steps=np.asarray(steps),
              learning_rate=np.asarray(lr, np.float32),
              tau=np.asarray(tau, np.float32))


# --------------------------------------------------------------------------
# 6: augmentation ops
# --------------------------------------------------------------------------
# Per-op semantics: see file 6 in the module docstring.


def augment_goldens():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from byol.utils import augmentations as aug  # pylint: disable=g-import-not-at-top

  images = uniform_images(3, (4, 32, 32, 3))
  n = images.shape[0]
  prs = np.random.RandomState(30)
  brightness_delta = prs.uniform(-0.4, 0.4, size=n).astype(np.float32)
  contrast_factor = prs.uniform(0.6, 1.4, size=n).astype(np.float32)
  saturation_factor = prs.uniform(0.8, 1.2, size=n).astype(np.float32)
  saturation_factor[0] = 2.5  # pushes S past 1 -> exercises the S clip
  hue_delta = prs.uniform(-0.1, 0.1, size=n).astype(np.float32)
  hue_delta[0] = 0.45
  blur_sigma = prs.uniform(0.1, 2.0, size=n).astype(np.float32)
  blur64_sigma = prs.uniform(0.1, 2.0, size=2).astype(np.float32)
  blur64_images = uniform_images(5, (2, 64, 64, 3))

  def split_rgb(image):
    return tuple(image[..., i] for i in range(3))

  def per_image(fn):
    return jax.jit(jax.vmap(fn))

  def brightness(image, delta):
    return jnp.stack(aug.adjust_brightness(split_rgb(image), delta), -1)

  def contrast(image, factor):
    return jnp.stack(aug.adjust_contrast(split_rgb(image), factor), -1)

  def saturation(image, factor):
    h, s, v = aug.rgb_to_hsv(*split_rgb(image))
    return jnp.stack(aug.hsv_to_rgb(*aug.adjust_saturation(h, s, v, factor)),
                     -1)

  def hue(image, delta):
    h, s, v = aug.rgb_to_hsv(*split_rgb(image))
    return jnp.stack(aug.hsv_to_rgb(*aug.adjust_hue(h, s, v, delta)), -1)

  blur_kernel_size = images.shape[1] / 10.  # gaussian_blur's H / blur_divider

  def blur(image, sigma, kernel_size):
    return aug._gaussian_blur_single_image(  # pylint: disable=protected-access
        image, kernel_size, 'SAME', sigma)

  r = dict(images=images)
  r.update({'brightness::delta': brightness_delta,
            'brightness::out': np.asarray(
                per_image(brightness)(images, brightness_delta))})
  r.update({'contrast::factor': contrast_factor,
            'contrast::out': np.asarray(
                per_image(contrast)(images, contrast_factor))})
  r.update({'saturation::factor': saturation_factor,
            'saturation::out': np.asarray(
                per_image(saturation)(images, saturation_factor))})
  r.update({'hue::delta': hue_delta,
            'hue::out': np.asarray(per_image(hue)(images, hue_delta))})
  r['grayscale::out'] = np.asarray(
      per_image(aug._to_grayscale)(images))  # pylint: disable=protected-access
  r.update({
      'blur::sigma': blur_sigma,
      'blur::kernel_size': np.float32(blur_kernel_size),
      'blur::effective_kernel_size': np.int32(
          2 * int(blur_kernel_size / 2) + 1),
      'blur::out': np.asarray(per_image(
          lambda im, s: blur(im, s, blur_kernel_size))(images, blur_sigma)),
  })
  r.update({
      'blur64::images': blur64_images,
      'blur64::sigma': blur64_sigma,
      'blur64::kernel_size': np.int32(23),
      'blur64::out': np.asarray(per_image(
          lambda im, s: blur(im, s, 23))(blur64_images, blur64_sigma)),
  })
  r.update({
      'solarize::threshold': np.float32(0.5),
      'solarize::out': np.asarray(aug.solarize(
          images, jax.random.PRNGKey(0), threshold=0.5, apply_prob=1.0)),
  })
  flip_key = jax.random.PRNGKey(3)
  flipped_out = np.asarray(aug.random_flip(images, flip_key))
  flipped = np.array([np.array_equal(flipped_out[i], images[i, :, ::-1]) and
                      not np.array_equal(flipped_out[i], images[i])
                      for i in range(n)])
  assert all(np.array_equal(flipped_out[i],
                            images[i, :, ::-1] if flipped[i] else images[i])
             for i in range(n))
  r.update({'flip::key': np.asarray(jax.random.key_data(flip_key)),
            'flip::flipped': flipped, 'flip::out': flipped_out})
  return r


# --------------------------------------------------------------------------
# 7: crop windows
# --------------------------------------------------------------------------
def crop_goldens(num_windows=4000):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from byol.utils import dataset  # pylint: disable=g-import-not-at-top

  recorded = []

  def recorder(image_bytes, crop_window, channels=3, **unused_kwargs):
    del image_bytes
    window = crop_window.numpy().astype(np.int32)
    recorded.append(window)
    return tf.zeros([int(window[2]), int(window[3]), channels], tf.uint8)

  # dataset.tf is `tensorflow.compat.v2`; patch the names it calls there and
  # on `tensorflow` itself (restored afterwards).
  targets = []
  for mod in {id(m): m for m in (dataset.tf.io, dataset.tf.image, tf.io,
                                 tf.image)}.values():
    targets.append((mod, getattr(mod, 'decode_and_crop_jpeg')))
    mod.decode_and_crop_jpeg = recorder
  try:
    result = {}
    jpeg_rs = np.random.RandomState(7)
    for seed, (h, w) in enumerate([(48, 64), (375, 500)]):
      pixels = jpeg_rs.randint(0, 256, size=(h, w, 3)).astype(np.uint8)
      jpeg = tf.io.encode_jpeg(tf.constant(pixels))
      assert list(tf.image.extract_jpeg_shape(jpeg).numpy()) == [h, w, 3]
      tf.random.set_seed(seed)
      recorded.clear()
      for _ in range(num_windows):
        dataset._decode_and_random_crop(jpeg)  # pylint: disable=protected-access
      result[f'windows_{h}x{w}'] = np.stack(recorded).astype(np.int32)
    sizes = [(32, 32), (48, 64), (375, 500), (500, 333), (224, 224), (17, 23)]
    centre = []
    for h, w in sizes:
      recorded.clear()
      dataset._decode_and_center_crop(  # pylint: disable=protected-access
          tf.constant(b''), jpeg_shape=tf.constant([h, w, 3], tf.int32))
      centre.append(recorded[0])
    result['center_sizes'] = np.array(sizes, np.int32)
    result['center_windows'] = np.stack(centre).astype(np.int32)
  finally:
    for mod, fn in targets:
      mod.decode_and_crop_jpeg = fn
  return result


# --------------------------------------------------------------------------
# 8: linear evaluation / fine-tuning
# --------------------------------------------------------------------------
def linear_eval_goldens(online_params, online_state):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from byol import eval_experiment  # pylint: disable=g-import-not-at-top
  from byol.utils import helpers  # pylint: disable=g-import-not-at-top

  def encoder_only(tree):
    return {m: dict(v) for m, v in tree.items()
            if m.split('/')[0] == 'tiny_res_net'}

  backbone_params = encoder_only(online_params)
  backbone_state = encoder_only(online_state)
  batches = []
  for k in range(3):
    rs = np.random.RandomState(200 + k)
    images = rs.uniform(0., 1., size=(8, 32, 32, 3)).astype(np.float32)
    labels = rs.randint(0, 10, size=(8,)).astype(np.int32)
    batches.append(dict(images=images, labels=labels))

  result = {}
  for k, b in enumerate(batches):
    for name, v in b.items():
      result[f'steps::{k}::{name}'] = v
  result.update(flatten('backbone_params', backbone_params))
  result.update(flatten('backbone_state', backbone_state))

  for freeze, prefix in ((True, ''), (False, 'ft_')):
    experiment = make_eval_experiment(freeze_backbone=freeze)
    init_fn = jax.pmap(experiment._make_initial_state, axis_name='i')  # pylint: disable=protected-access
    state = init_fn(rng=helpers.bcast_local_devices(jax.random.PRNGKey(0)),
                    dummy_input=add_device_axis(batches[0]),
                    backbone_params=helpers.bcast_local_devices(
                        backbone_params),
                    backbone_state=helpers.bcast_local_devices(backbone_state))
    if freeze:  # as in EvalExperiment._initialize_train
      state = eval_experiment._EvalExperimentState(  # pylint: disable=protected-access
          backbone_params=state.backbone_params,
          classif_params=state.classif_params,
          backbone_state=state.backbone_state,
          backbone_opt_state=None,
          classif_opt_state=state.classif_opt_state)
    result.update(flatten(prefix + 'init_classif', state.classif_params, True))
    losses = []
    for k, b in enumerate(batches):
      state, scalars = experiment.update_pmap(
          state, jnp.full([1], k, jnp.int32), add_device_axis(b))
      losses.append(np.asarray(scalars['train_loss'])[0])
    result[prefix + 'train_loss'] = np.asarray(losses, np.float32)
    result.update(flatten(prefix + 'classif', state.classif_params, True))
    result.update(flatten(prefix + 'classif_trace',
                          sgd_trace(state.classif_opt_state), True))
    if not freeze:
      result.update(flatten('ft_backbone_params', state.backbone_params, True))
      result.update(flatten('ft_backbone_state', state.backbone_state, True))
  # The classifier init does not depend on freeze_backbone; keep one copy.
  np.testing.assert_array_equal(
      result['init_classif::linear::w'], result.pop('ft_init_classif::linear::w'))
  np.testing.assert_array_equal(
      result['init_classif::linear::b'], result.pop('ft_init_classif::linear::b'))
  return result


# --------------------------------------------------------------------------
# 9: checkpoint + embeddings
# --------------------------------------------------------------------------
def pickle_globals(path):
  """Module-qualified names referenced by (STACK_)GLOBAL opcodes."""
  names = []
  with open(path, 'rb') as f:
    data = f.read()
  strings = []
  for opcode, arg, _ in pickletools.genops(data):
    if opcode.name == 'GLOBAL':
      names.append(arg.replace(' ', '.'))
    elif opcode.name in ('SHORT_BINUNICODE', 'BINUNICODE', 'UNICODE'):
      strings.append(arg)
    elif opcode.name == 'STACK_GLOBAL':
      names.append(f'{strings[-2]}.{strings[-1]}')
  return sorted(set(names))


def checkpoint_goldens(final_state, out_dir, report):
  import jax  # pylint: disable=g-import-not-at-top
  from byol.utils import checkpointing  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory() as tmp:
    checkpointer = checkpointing.Checkpointer(
        use_checkpointing=True, checkpoint_dir=tmp,
        save_checkpoint_interval=1, filename='pretrain.pkl')
    checkpointer.maybe_save_checkpoint(
        final_state, step=6, rng=jax.random.PRNGKey(6), is_final=True)
    src = os.path.join(tmp, 'pretrain.pkl')
    dst = os.path.join(out_dir, 'reference_pretrain_tiny.pkl')
    shutil.copyfile(src, dst)
    report.append(dst)
  names = pickle_globals(dst)
  print('pickle classes: ' + ', '.join(names))
  if tuple(names) != PICKLE_GLOBALS:
    print('WARNING: the pickle references a different set than PICKLE_GLOBALS '
          '(other numpy/jax/optax versions?); update the comment.')

  data = checkpointing.load_checkpoint(dst)
  params = data['experiment_state'].online_params
  state = data['experiment_state'].online_state
  experiment = make_eval_experiment(freeze_backbone=True)
  images = uniform_images(4, (4, 32, 32, 3))
  embeddings, _ = experiment.forward_backbone.apply(
      params, state, {'images': images}, is_training=False)
  # Same embeddings from the encoder-only subset of the params.
  sub = {m: v for m, v in params.items() if m.split('/')[0] == 'tiny_res_net'}
  sub_emb, _ = experiment.forward_backbone.apply(
      sub, state, {'images': images}, is_training=False)
  np.testing.assert_array_equal(np.asarray(embeddings), np.asarray(sub_emb))
  return dict(images=images, embeddings=np.asarray(embeddings),
              step=np.int64(data['step']),
              rng=np.asarray(jax.random.key_data(data['rng']))), names


# --------------------------------------------------------------------------
def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument(
      '--reference', default=os.path.join(REPO, '..', 'shared', 'reference'),
      help='folder that contains the reference package `byol/`')
  parser.add_argument('--out', default=HERE, help='output folder')
  args = parser.parse_args(argv)
  reference = os.path.abspath(args.reference)
  if not os.path.isdir(os.path.join(reference, 'byol')):
    parser.error(f'no byol/ package under {reference}')
  out_dir = os.path.abspath(args.out)
  os.makedirs(out_dir, exist_ok=True)

  t0 = time.time()
  install_shims()
  sys.path.insert(0, reference)
  import jax  # pylint: disable=g-import-not-at-top
  import byol.byol_experiment  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  import byol.eval_experiment  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  assert jax.device_count() == 1, jax.devices()
  assert not jax.config.jax_enable_x64

  report = []
  # 1.
  tiny, _ = network_goldens(
      make_byol_experiment(tiny_network_config(None), num_classes=10),
      uniform_images(0, (4, 32, 32, 3)))
  save(out_dir, 'tiny_network.npz', tiny, report)

  # 2.
  r50_config = dict(
      tiny_network_config(None), encoder_class='ResNet50',
      projector_hidden_size=4096, projector_output_size=256,
      predictor_hidden_size=4096)
  r50_exp = make_byol_experiment(r50_config, num_classes=1000)
  r50, r50_state = network_goldens(
      r50_exp, uniform_images(1, (4, 64, 64, 3)), with_eval=False, full=False)
  r50['encoder_param_count'] = np.int64(sum(
      int(np.size(v)) for m, tree in r50_state.online_params.items()
      if m.split('/')[0] == 'res_net50' for v in tree.values()))
  del r50_state
  save(out_dir, 'resnet50_init.npz', r50, report)

  # 3.
  update, final_state = update_goldens()
  save(out_dir, 'update.npz', update, report)

  # 4, 5.
  save(out_dir, 'loss.npz', loss_goldens(), report)
  save(out_dir, 'schedules.npz', schedule_goldens(), report)

  # 6.
  save(out_dir, 'augment_ops.npz', augment_goldens(), report)

  # 7.
  save(out_dir, 'crop_windows.npz', crop_goldens(), report)

  # 8.
  online_params = _unflatten(tiny, 'online_params')
  online_state = _unflatten(tiny, 'online_state')
  save(out_dir, 'linear_eval.npz',
       linear_eval_goldens(online_params, online_state), report)

  # 9.
  emb, _ = checkpoint_goldens(final_state, out_dir, report)
  save(out_dir, 'reference_pretrain_tiny_embeddings.npz', emb, report)

  total = 0
  for path in report:
    size = os.path.getsize(path)
    total += size
    print(f'{os.path.relpath(path, os.getcwd())}: {size} bytes')
  print(f'total {total} bytes, {time.time() - t0:.1f} s')


def _unflatten(flat, prefix):
  tree = {}
  for key, value in flat.items():
    parts = key.split('::')
    if len(parts) == 3 and parts[0] == prefix:
      tree.setdefault(parts[1], {})[parts[2]] = value
  return tree


if __name__ == '__main__':
  main()
