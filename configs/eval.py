r"""Evaluation configs: `python -m byol_jax.main_loop --config=configs/eval.py[:preset]`.

`--config.checkpoint` is required: a pretraining workdir (its latest checkpoint is read) or an
export file (`python -m byol_jax.export`). The encoder is rebuilt from the model config stored
with it, never from this file. Results go to WORKDIR/eval_results.json, metrics.jsonl and
TensorBoard.

The preset is a dataset, optionally followed by protocol modifiers after commas:
`demo,knn`, `cifar10,1pct`, `imagenet,finetune`. Dataset (default `imagenet`):

* `imagenet` — the reference's linear evaluation (its eval_experiment.py, configs/eval.py and
  main_loop.py defaults): frozen encoder in inference mode; a fresh `hk.Linear(1000)` in its own
  transform with Haiku's default init (truncated normal, std 1/sqrt(fan_in), zero bias) from
  PRNGKey(seed=0); batch 4096; SGD + Nesterov 0.9, no weight decay, LR 0.2 x batch/256 cosine
  to 0, no warmup, 80 epochs (80 x 1,281,167 // 4096 = 25,022 steps) on all 1,281,167 TFDS
  training images (`data.train_on_validation=True`, the reference's TRAIN_AND_VALID) with
  random crop + flip; loss the global batch mean of the softmax cross-entropy; top-1/top-5 and
  the mean cross-entropy on the 50,000 official validation images (TFDS `validation`, the
  reference's test set), centre crops, batch 100.
    python -m byol_jax.main_loop --config=configs/eval.py \
      --config.checkpoint=/tmp/byol_imagenet --workdir=/tmp/byol_imagenet_linear
  Expected (paper, ResNet-50 1x, 1000 epochs of pretraining): 74.3% top-1, 91.6% top-5.

* `cifar10` — the same protocol on TFDS CIFAR-10 at 32 px, batch 512, test split (10,000);
  the 5,000 images held out of pretraining stay out of training here too
  (`data.train_on_validation=False`, as configs/byol.py:cifar10).
    python -m byol_jax.main_loop --config=configs/eval.py:cifar10 \
      --config.checkpoint=/tmp/byol_cifar10 --workdir=/tmp/byol_cifar10_linear
  Expected (peers, ResNet-18, 1000 epochs of pretraining): ~92% top-1.

* `cifar10_cpu` — the data of `configs/byol.py:cifar10_cpu`: the shared CIFAR-10 JPEG folder at
  32 px, scored on its held-out first 500 images per class (it has no test split), which
  training leaves out (`data.train_on_validation=False`). kNN over the
  45,000-image bank takes ~4 minutes on 2 CPU cores; linear evaluation at 80 epochs is hours
  there (shorten with --config.num_epochs).
    python -m byol_jax.main_loop --config=configs/eval.py:cifar10_cpu,knn \
      --config.checkpoint=/tmp/byol_cifar_cpu --workdir=/tmp/byol_cifar_cpu_knn

* `demo` — the digits checkpoint of `configs/byol.py:demo`, 16 px, its 297 held-out images;
  batch 128, 80 epochs (937 steps):
    python -m byol_jax.main_loop --config=configs/byol.py:demo --workdir=/tmp/byol_demo
    python -m byol_jax.main_loop --config=configs/eval.py:demo \
      --config.checkpoint=/tmp/byol_demo --workdir=/tmp/byol_demo_linear
  Expected (measured 2026-12-04 on the demo checkpoint of that date, idle 2-core machine,
  1m10s): 82.5% top-1, 97.0% top-5; kNN (`demo,knn`, k=20, seconds) 79.8%. For scale, the
  pretraining run's own kNN baselines: random-init encoder 70.0%, raw pixels 94.6%. (Before
  the reference-conformance changes, 2026-11-29: 91.6% linear, 89.9% kNN.)
  Flips stay off and crops mild, as in the demo pretraining (flips change digit identity).

Modifiers:

* `knn` — weighted kNN (cosine, k=200, temperature 0.1; k=20 for `demo`, whose classes have
  ~150 training images) of the held-out features against the unaugmented training features.
  No training; seconds for the demo:
    python -m byol_jax.main_loop --config=configs/eval.py:demo,knn \
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
"""

import ml_collections

DATASETS = ('imagenet', 'cifar10', 'cifar10_cpu', 'demo')
MODIFIERS = ('knn', 'finetune', '1pct', '10pct')


def get_config(preset='imagenet'):
  """Returns the evaluation config for `preset` ('dataset[,modifier...]', see above)."""
  names = [name for name in preset.split(',') if name]
  unknown = [name for name in names if name not in DATASETS + MODIFIERS]
  datasets = [name for name in names if name in DATASETS]
  if unknown or len(datasets) > 1:
    raise ValueError(f'Unknown preset {preset!r}: one of {", ".join(DATASETS)}, then any of '
                     f'{", ".join(MODIFIERS)} after commas (e.g. demo,knn).')
  dataset = datasets[0] if datasets else 'imagenet'

  config = ml_collections.ConfigDict()
  config.experiment = 'linear_eval'
  config.preset = preset
  config.seed = 0

  # What is evaluated, and how.
  config.checkpoint = ''  # Pretraining workdir (latest checkpoint) or export file. Required.
  config.protocol = 'linear'  # linear: train a linear layer on the encoder; knn: no training.
  config.freeze_backbone = True  # False: fine-tune the encoder with the linear layer.
  config.labelled_fraction = 1.0  # < 1: semi-supervised, a class-balanced subset of train.

  # Data. Same keys and meaning as configs/byol.py; set them as the pretraining run had them
  # so that `validation` is the same held-out split.
  config.dataset = 'imagenet2012'
  config.num_classes = 1000
  config.image_size = 224
  config.eval_split = 'test'  # Where top-1/top-5 are measured (validation: carved from train).
  config.eval_batch_size = 100  # Global, centre crops (reference: 100 on `test`).
  config.data = ml_collections.ConfigDict(dict(
      data_dir='',
      validation_examples=10_000,  # 'validation' = the first N labelled training examples.
      # True (reference, TRAIN_AND_VALID): the linear layer trains on every labelled training
      # example, the hold-out included; False (TRAIN): the hold-out stays out of training.
      train_on_validation=True,
      skip_corrupt_images=False,
      shuffle_buffer=10_000,
  ))
  # Linear-evaluation training augmentation: random resized crop + flip, nothing else.
  config.augment = ml_collections.ConfigDict(dict(
      crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), crop_sampler='reference', flip=True))

  # Optimisation (reference linear evaluation).
  config.batch_size = 4096  # Global (the reference's main_loop --batch_size default).
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

  config.knn = ml_collections.ConfigDict(dict(k=200, temperature=0.1))
  config.log_every_steps = 100

  if dataset in ('cifar10', 'cifar10_cpu'):
    config.dataset = 'cifar10'
    config.num_classes = 10
    config.image_size = 32
    config.batch_size = 512
    config.data.validation_examples = 5_000
    config.data.train_on_validation = False
  if dataset == 'cifar10_cpu':
    config.dataset = 'folder:../shared/data/cifar10'  # As configs/byol.py:cifar10_cpu.
    config.eval_split = 'validation'
    config.batch_size = 256
  elif dataset == 'demo':
    config.dataset = 'digits'
    config.num_classes = 10
    config.image_size = 16
    config.eval_split = 'validation'
    config.data.validation_examples = 297
    config.data.train_on_validation = False
    config.data.shuffle_buffer = 2_000
    config.augment.crop_scale = (0.5, 1.0)
    config.augment.flip = False
    config.batch_size = 128
    config.log_every_steps = 50
    config.knn.k = 20

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
