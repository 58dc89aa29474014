r"""Evaluation config: `python -m byol_jax.main_loop --config=configs/eval.py[:modifiers]`.

The checkpoint alone says what is evaluated and on which data:

    python -m byol_jax.main_loop --config=configs/eval.py \
      --config.checkpoint=WORKDIR_OR_EXPORT --workdir=OUT

`--config.checkpoint` is required: a pretraining workdir (its latest readable checkpoint) or an
export file (`python -m byol_jax.export`). The encoder is rebuilt from the model config stored
with it, and the data description comes from the pretraining run too (evaluation/pretrained.py):
this file holds evaluation settings only. Results go to OUT/eval_results.json, metrics.jsonl and
TensorBoard.

What comes from the pretraining run unless set here (the keys left unset below, None / ''):

* `dataset`, `image_size`, `num_classes`, and `data.*` (data_dir, validation_examples,
  train_on_validation, eval_crop_fraction, skip_corrupt_images, shuffle_buffer): as the run had
  them, so that `validation` is the same hold-out, the held-out images stay out of training when
  pretraining left them out, and images are scored as the run's own kNN scored them (the
  reference's 0.875 centre crop for imagenet and for runs that predate the setting; the whole
  image for cifar10, cifar10_cpu and demo). An export file stores dataset, image_size and
  num_classes; the rest is read from the workdir it was exported from (its `source`) when that
  is still readable, otherwise `data.validation_examples` and `data.train_on_validation` must be
  given (and `data.eval_crop_fraction` is 0.875 unless set).
* `eval_split`: `test` when the dataset has one (ImageNet: the 50,000 TFDS validation images,
  the reference's test set), else `validation` (digits, image folders without a test split).
* `batch_size`: the run's global batch size, at least 128 (ImageNet 4096 as the reference's
  linear evaluation, CIFAR-10 512, the CPU presets 128); 256 for an export file whose workdir
  is gone (as are crop (0.08, 1) + flips and kNN k=200, T=0.1 then).
* `augment.crop_scale`, `augment.flip`: the run's (ImageNet (0.08, 1) + flips, as the reference;
  the digits (0.5, 1) without flips, which change digit identity).
* `knn.k`, `knn.temperature`: the run's `final_knn` (200 and 0.1; 20 for the digits, whose
  classes have ~150 training images).

An explicit setting wins: `--config.dataset=folder:/data/other --config.num_classes=37`
evaluates on other data (the linear layer and the kNN labels are fresh, so any number of
classes works; labels outside [0, num_classes) stop the run with one line). A different
`--config.image_size` is allowed: every encoder here is convolutional with global average
pooling, so it accepts any size (a line says so, since its BatchNorm statistics were measured
at the pretraining size). A dataset that cannot be found or read is one `error:` line.

Protocol modifiers after the colon, comma separated (none: linear evaluation):

* (none) — the reference's linear evaluation (its eval_experiment.py, configs/eval.py and
  main_loop.py defaults): frozen encoder in inference mode; a fresh `hk.Linear(num_classes)` in
  its own transform with Haiku's default init from PRNGKey(seed=0); SGD + Nesterov 0.9, no
  weight decay, LR 0.2 x batch/256 cosine to 0, no warmup, 80 epochs on the labelled training
  split with random crop + flip; loss the global batch mean of the softmax cross-entropy;
  top-1/top-5 and the mean cross-entropy on `eval_split`, centre crops, batch 100. ImageNet
  (configs/byol.py:imagenet): 80 x 1,281,167 // 4096 = 25,022 steps on every training image
  (the reference's TRAIN_AND_VALID).
    python -m byol_jax.main_loop --config=configs/eval.py \
      --config.checkpoint=/tmp/byol_imagenet --workdir=/tmp/byol_imagenet_linear
  Expected (paper, ResNet-50 1x, 1000 epochs of pretraining): 74.3% top-1, 91.6% top-5.
  CIFAR-10 (configs/byol.py:cifar10; peers, ResNet-18, 1000 epochs): ~92% top-1.
  The digits (configs/byol.py:demo), 80 epochs at batch 128 (937 steps):
    python -m byol_jax.main_loop --config=configs/byol.py:demo --workdir=/tmp/byol_demo
    python -m byol_jax.main_loop --config=configs/eval.py \
      --config.checkpoint=/tmp/byol_demo --workdir=/tmp/byol_demo_linear
  Expected (measured 2026-12-04 on the demo checkpoint of the current code, from a clean
  clone): 79.1% top-1, 97.0% top-5 on its 297 held-out images. For scale, the pretraining
  run's own kNN baselines: random-init encoder 71.0%, raw pixels 94.6%.
* `knn` — weighted kNN (cosine, `knn.k`, `knn.temperature`) of the `eval_split` features
  against the unaugmented labelled training features. No training; seconds for the digits
  (expected 78.5% top-1 on the checkpoint above), ~4 minutes for the 45,000-image bank of
  configs/byol.py:cifar10_cpu on 2 CPU cores:
    python -m byol_jax.main_loop --config=configs/eval.py:knn \
      --config.checkpoint=/tmp/byol_demo --workdir=/tmp/byol_demo_knn
* `finetune` — the encoder is trained too, its BatchNorm in training mode with PER-DEVICE
  statistics as in the reference (`cross_replica_bn=True` synchronises them over all devices,
  so that results do not depend on the device count); otherwise the linear-evaluation recipe.
* `1pct` / `10pct` — semi-supervised: fine-tuning on a class-balanced 1% / 10% of the training
  split, chosen once with `seed` (round(fraction x N / classes) images per class; ImageNet 1%:
  13 per class). The paper used SimCLR's published subset lists instead and reports 53.2% /
  68.8% top-1 for ResNet-50; our selection differs, so compare numbers between our runs.
  Subsets are read from in-memory and `folder:` datasets (for ImageNet, its folder layout:
  --config.dataset=folder:/data/imagenet), not from TFDS-streamed ones.

The dataset presets of earlier versions (`imagenet`, `cifar10`, `cifar10_cpu`, `demo`) are
gone: `configs/eval.py:demo,knn` is now `configs/eval.py:knn` with the demo checkpoint.
"""

import ml_collections
from ml_collections import config_dict

MODIFIERS = ('knn', 'finetune', '1pct', '10pct')
REMOVED_DATASET_PRESETS = ('imagenet', 'cifar10', 'cifar10_cpu', 'demo')


def get_config(preset=''):
  """Returns the evaluation config for `preset` (protocol modifiers, comma separated)."""
  names = [name for name in preset.split(',') if name]
  removed = [name for name in names if name in REMOVED_DATASET_PRESETS]
  if removed:
    raise ValueError(f'configs/eval.py has no dataset presets any more ({removed[0]!r}): the '
                     f'data comes from --config.checkpoint (override with --config.dataset=...); '
                     f'modifiers: {", ".join(MODIFIERS)}.')
  unknown = [name for name in names if name not in MODIFIERS]
  if unknown:
    raise ValueError(f'Unknown preset {unknown[0]!r} in {preset!r}: any of '
                     f'{", ".join(MODIFIERS)}, comma separated (e.g. knn, or finetune).')

  config = ml_collections.ConfigDict()
  config.experiment = 'linear_eval'
  config.preset = preset
  config.seed = 0

  # What is evaluated, and how.
  config.checkpoint = ''  # Pretraining workdir (latest checkpoint) or export file. Required.
  config.protocol = 'linear'  # linear: train a linear layer on the encoder; knn: no training.
  config.freeze_backbone = True  # False: fine-tune the encoder with the linear layer.
  config.labelled_fraction = 1.0  # < 1: semi-supervised, a class-balanced subset of train.

  # Data: unset (None) = as the pretraining run had it (see the docstring); same keys and
  # meaning as configs/byol.py.
  config.dataset = config_dict.placeholder(str)
  config.num_classes = config_dict.placeholder(int)
  config.image_size = config_dict.placeholder(int)
  config.eval_split = config_dict.placeholder(str)  # None: test if the dataset has one.
  config.eval_batch_size = 100  # Global, centre crops (reference: 100 on `test`).
  config.data = ml_collections.ConfigDict(dict(
      data_dir=config_dict.placeholder(str),
      validation_examples=config_dict.placeholder(int),
      # True (reference, TRAIN_AND_VALID): the linear layer trains on every labelled training
      # example, the hold-out included; False (TRAIN): the hold-out stays out of training.
      train_on_validation=config_dict.placeholder(bool),
      skip_corrupt_images=config_dict.placeholder(bool),
      shuffle_buffer=config_dict.placeholder(int),
      # Share of the short side kept by evaluation's centre crop: 0.875 the reference's, 1.0
      # the whole image (the small-image presets).
      eval_crop_fraction=config_dict.placeholder(float),
  ))
  # Linear-evaluation training augmentation: random resized crop + flip, nothing else.
  config.augment = ml_collections.ConfigDict(dict(
      crop_scale=config_dict.placeholder(tuple), crop_ratio=(3 / 4, 4 / 3),
      crop_sampler='reference', flip=config_dict.placeholder(bool)))

  # Optimisation (reference linear evaluation).
  config.batch_size = config_dict.placeholder(int)  # Global; None: the run's, at least 128.
  config.num_epochs = 80
  config.max_steps = 0  # 0: num_epochs * labelled train examples // batch_size.
  config.optimizer = ml_collections.ConfigDict(dict(
      base_lr=0.2,  # Scaled by batch_size / 256; cosine to 0, no warmup.
      momentum=0.9,
      nesterov=True,
      weight_decay=0.0,  # Never on biases / BatchNorm.
  ))

  # Fine-tuning's BatchNorm statistics: False (reference) per device; True across devices.
  config.cross_replica_bn = False

  config.knn = ml_collections.ConfigDict(dict(k=config_dict.placeholder(int),
                                              temperature=config_dict.placeholder(float)))
  config.log_every_steps = 100
  # Checkpoints of linear evaluation / fine-tuning (kNN trains nothing), as pretraining's
  # (configs/byol.py): every N steps and/or seconds (0: off) and on SIGTERM / Ctrl-C, into
  # WORKDIR/checkpoints; the same command resumes exactly. The last `keep_checkpoints` are kept.
  config.checkpoint_every_steps = 0
  config.checkpoint_every_secs = 300
  config.keep_checkpoints = 2
  # True: checkpoints that cannot be resumed (unreadable, another config or another pretrained
  # encoder) are moved aside to checkpoints.old-<time> and training starts at step 0.
  config.restart_from_scratch = False
  config.lock_stale_after_secs = 3600  # A lock from another host not refreshed for this long.

  if 'knn' in names:
    config.protocol = 'knn'
  if 'finetune' in names or '1pct' in names or '10pct' in names:
    config.freeze_backbone = False
  if '1pct' in names:
    config.labelled_fraction = 0.01
  if '10pct' in names:
    config.labelled_fraction = 0.1

  config.lock()
  return config
