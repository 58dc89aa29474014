"""PyTorch side of `python -m byol_jax.export --format=torchvision`.

    from byol_jax.runtime import torchvision_resnet
    model = torchvision_resnet.load('encoder.safetensors')  # eval mode, SAME padding, fc=Identity
    features = model(normalised_images)  # NCHW, normalised as for torchvision's ImageNet models

The export is the state dict of a `torchvision.models.ResNet` with `fc = torch.nn.Identity()`.
For ResNet-50/101/152 at width 1 with the ImageNet stem it loads with `strict=True` into the
stock `torchvision.models.resnet50()` etc.; `build` makes the module for the other cases from
the architecture recorded in the file's metadata, using torchvision's own ResNet classes:

* ResNet-18/34: BYOL (as the reference) projects the shortcut of every group's first block,
  stage 0 included; torchvision's `resnet18`/`resnet34` have no `layer1.0.downsample`. `build`
  adds it (a 1x1 conv + BatchNorm, as torchvision's other downsamples).
* width != 1: BYOL multiplies every channel count, the stem's and the output's included
  (ResNet-50 2x gives 4096-d features). torchvision's `wide_resnet50_2` is a different network
  (only the bottlenecks' inner width doubles; 64-channel stem, 2048-d features). `build` calls
  torchvision's `_make_layer` with the scaled widths.
* ResNet-200, tiny_resnet: `ResNet(Bottleneck, [3, 24, 36, 3])`, `ResNet(BasicBlock, [1] * 4)`
  with 8 planes.
* model.cifar_stem: a 3x3 stride-1 `conv1` and no max-pool.
* model.bn_eps: set on every BatchNorm2d.

Padding: the encoder uses TF/Haiku SAME padding. For a stride-2 layer on an even-sized input the
extra padding pixel goes bottom/right only, where torchvision pads both sides by k//2: every
stride-2 conv and the max-pool then read a window shifted by one pixel. `same_padding_` makes
the model compute SAME padding exactly (forward pre-hooks that pad explicitly with `F.pad`, the
convs' and pool's own padding set to 0); the state dict is unchanged.

torch, torchvision and safetensors are imported when a function here is called, never when
`byol_jax` is imported. Nothing here imports JAX.
"""

import json
import math
import sys

# The ImageNet statistics torchvision's ImageNet models expect (= networks.IMAGENET_MEAN/STD, with
# which the JAX encoder normalises its [0, 1] inputs itself).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TORCHVISION_FORMAT = 'byol_jax.torchvision'  # = export.TORCHVISION_FORMAT
TORCHVISION_FORMAT_VERSION = 1


def import_torchvision():
  """`import torchvision`, also where its C++ ops cannot load.

  PyPI's torchvision wheels for Linux x86-64 are built against the CUDA build of torch. With the
  CPU build (`torch==X+cpu`) their C++ extension (nms, roi_align, ...: detection ops that ResNet
  never calls) fails to load, and torchvision 0.2x then fails at import, registering fake
  kernels for `torchvision::nms` and `::qnms`, which do not exist. In that case only, this
  declares those operators' schemas (without kernels: calling them raises) and imports again.
  """
  import torch  # pylint: disable=import-outside-toplevel
  try:
    import torchvision  # pylint: disable=import-outside-toplevel
    return torchvision
  except RuntimeError as e:
    first_error = e
  stubs = []
  for _ in range(8):
    message = str(first_error)
    name = message.split('torchvision::', 1)[-1].split()[0] if 'torchvision::' in message else None
    if name is None or 'does not exist' not in message or name in stubs:
      raise first_error
    for module in [m for m in sys.modules if m == 'torchvision' or m.startswith('torchvision.')]:
      del sys.modules[module]
    if not hasattr(import_torchvision, '_library'):
      import_torchvision._library = torch.library.Library('torchvision', 'DEF')  # Kept alive.
    import_torchvision._library.define(
        f'{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
    stubs.append(name)
    try:
      import torchvision  # pylint: disable=import-outside-toplevel,redefined-outer-name
      return torchvision
    except RuntimeError as e:
      first_error = e
  raise first_error


def _same_padding(size: int, kernel: int, stride: int):
  """TF SAME padding (before, after) along one axis: the extra pixel goes after."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def _pair(value):
  return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _same_padding_hook(kernel, stride, value):
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel

  def hook(module, args):
    del module
    x = args[0]
    top, bottom = _same_padding(x.shape[-2], kernel[0], stride[0])
    left, right = _same_padding(x.shape[-1], kernel[1], stride[1])
    return (F.pad(x, (left, right, top, bottom), value=value),) + tuple(args[1:])

  return hook


def same_padding_(model):
  """Makes every Conv2d and MaxPool2d of `model` pad as TF/Haiku SAME, in place; returns it.

  Each such layer gets padding 0 and a forward pre-hook that pads its input with
  `F.pad(x, (left, right, top, bottom))`, computed from the input's size as TF does (zeros for
  convs, -inf for max-pools, whose SAME padding never wins). Stride-1 convs with an odd kernel
  and padding k//2 are already SAME and are left alone. The state dict does not change. Calling
  it twice is harmless.
  """
  from torch import nn  # pylint: disable=import-outside-toplevel
  for module in model.modules():
    if getattr(module, '_byol_same_padding', False):
      continue
    if isinstance(module, nn.Conv2d):
      kernel, stride = _pair(module.kernel_size), _pair(module.stride)
      if isinstance(module.padding, str) or module.padding_mode != 'zeros' \
          or _pair(module.dilation) != (1, 1):
        raise ValueError(f'same_padding_ handles zero-padded, undilated convs; got {module}.')
      if stride == (1, 1) and all(k % 2 for k in kernel) \
          and _pair(module.padding) == (kernel[0] // 2, kernel[1] // 2):
        continue
      value = 0.0
    elif isinstance(module, nn.MaxPool2d):
      kernel = _pair(module.kernel_size)
      stride = _pair(module.stride if module.stride is not None else module.kernel_size)
      if module.ceil_mode or _pair(module.dilation) != (1, 1):
        raise ValueError(f'same_padding_ handles max-pools without ceil_mode or dilation; '
                         f'got {module}.')
      value = -math.inf
    else:
      continue
    module.padding = (0, 0) if isinstance(module, nn.Conv2d) else 0
    module.register_forward_pre_hook(_same_padding_hook(kernel, stride, value))
    module._byol_same_padding = True  # pylint: disable=protected-access
  return model


def build(architecture: dict):
  """The torchvision ResNet (fc = Identity) that takes an export with this `architecture`.

  `architecture` is the `torchvision` entry of the export's metadata
  (`export.torchvision_architecture`). Weights are torchvision's random init; padding is
  torchvision's (see `same_padding_`).
  """
  from torch import nn  # pylint: disable=import-outside-toplevel
  resnet = import_torchvision().models.resnet
  block = {'BasicBlock': resnet.BasicBlock, 'Bottleneck': resnet.Bottleneck}[
      architecture['block']]
  layers, planes = list(architecture['layers']), list(architecture['planes'])
  model = resnet.ResNet(block, layers)
  stem, kernel, stride = (architecture['stem_channels'], architecture['stem_kernel'],
                          architecture['stem_stride'])
  if (stem, kernel, stride, planes) != (64, 7, 2, [64, 128, 256, 512]):
    model.conv1 = nn.Conv2d(3, stem, kernel, stride, padding=kernel // 2, bias=False)
    model.bn1 = nn.BatchNorm2d(stem)
    model.inplanes = stem
    for g, (p, n) in enumerate(zip(planes, layers)):
      setattr(model, f'layer{g + 1}', model._make_layer(  # pylint: disable=protected-access
          block, p, n, stride=1 if g == 0 else 2))
  if not architecture['max_pool']:
    model.maxpool = nn.Identity()
  inplanes = stem
  for g, p in enumerate(planes):
    first = getattr(model, f'layer{g + 1}')[0]
    if first.downsample is None:  # BYOL projects every group's first block; torchvision not.
      first.downsample = nn.Sequential(
          resnet.conv1x1(inplanes, p * block.expansion, 1 if g == 0 else 2),
          nn.BatchNorm2d(p * block.expansion))
    inplanes = p * block.expansion
  model.fc = nn.Identity()
  for module in model.modules():
    if isinstance(module, nn.BatchNorm2d):
      module.eps = architecture['bn_eps']
  return model


def read_metadata(path: str) -> dict:
  """The header metadata of a torchvision export, JSON values decoded."""
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  with safe_open(path, framework='pt') as f:
    header = f.metadata() or {}
  if header.get('format') != TORCHVISION_FORMAT:
    raise ValueError(f'{path} is not a byol_jax torchvision export (format '
                     f'{header.get("format")!r}; export with --format=torchvision).')
  if json.loads(header.get('format_version', '0')) != TORCHVISION_FORMAT_VERSION:
    raise ValueError(f'{path} has format_version {header.get("format_version")}; this code reads '
                     f'{TORCHVISION_FORMAT_VERSION}.')
  return {key: json.loads(value) if key in ('format_version', 'step', 'image_size',
                                            'num_classes', 'seed', 'model', 'torchvision')
          else value for key, value in header.items()}


def load(path: str, same_padding: bool = True):
  """The exported encoder as a torchvision ResNet in eval mode (strictly loaded, fc=Identity).

  Input: NCHW float, RGB in [0, 1] normalised with IMAGENET_MEAN/STD (torchvision's usual
  `transforms.Normalize`). Output: the pooled features. `same_padding=False` keeps torchvision's
  symmetric padding (features then differ slightly from the JAX encoder's).
  """
  from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel
  model = build(read_metadata(path)['torchvision'])
  model.load_state_dict(load_file(path), strict=True)
  if same_padding:
    same_padding_(model)
  return model.eval()
