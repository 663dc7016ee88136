"""torchvision's ResNet, ported from ``torchvision/models/resnet.py`` (v0.11 onwards: ``conv3x3``,
``conv1x1``, ``BasicBlock``, ``Bottleneck`` with the stride on its 3×3 convolution, ``ResNet``
with ``_make_layer``; groups, dilation and the norm layer argument left out) as the PyTorch
reference of the parity tests; torchvision itself cannot be installed beside the CPU torch. The
one change: the stage widths (64, 128, 256, 512) and the stem's 64 are arguments, for tiny
models. Keys are torchvision's (timm's ``resnet50`` state dict uses the same)."""
import numpy as np
import torch
from torch import nn

ARCHITECTURES = {"resnet18": ("basic", [2, 2, 2, 2]), "resnet34": ("basic", [3, 4, 6, 3]),
                 "resnet50": ("bottleneck", [3, 4, 6, 3]),
                 "resnet101": ("bottleneck", [3, 4, 23, 3]),
                 "resnet152": ("bottleneck", [3, 8, 36, 3])}


def conv3x3(in_planes, out_planes, stride=1):
  return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes, out_planes, stride=1):
  return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = conv3x3(inplanes, planes, stride)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = conv3x3(planes, planes)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample
    self.stride = stride

  def forward(self, x):
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    if self.downsample is not None:
      identity = self.downsample(x)
    out += identity
    return self.relu(out)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    width = planes
    self.conv1 = conv1x1(inplanes, width)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = conv3x3(width, width, stride)
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3 = conv1x1(width, planes * self.expansion)
    self.bn3 = nn.BatchNorm2d(planes * self.expansion)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample
    self.stride = stride

  def forward(self, x):
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    if self.downsample is not None:
      identity = self.downsample(x)
    out += identity
    return self.relu(out)


class ResNet(nn.Module):

  def __init__(self, block, layers, num_classes=1000, widths=(64, 128, 256, 512), stem=64):
    super().__init__()
    self.inplanes = stem
    self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(self.inplanes)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    self.layer1 = self._make_layer(block, widths[0], layers[0])
    self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2)
    self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2)
    self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(widths[3] * block.expansion, num_classes)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
      elif isinstance(m, nn.BatchNorm2d):
        nn.init.constant_(m.weight, 1)
        nn.init.constant_(m.bias, 0)

  def _make_layer(self, block, planes, blocks, stride=1):
    downsample = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                 nn.BatchNorm2d(planes * block.expansion))
    layers = [block(self.inplanes, planes, stride, downsample)]
    self.inplanes = planes * block.expansion
    for _ in range(1, blocks):
      layers.append(block(self.inplanes, planes))
    return nn.Sequential(*layers)

  def stem(self, x):
    return self.maxpool(self.relu(self.bn1(self.conv1(x))))

  def features(self, x):
    x = self.stem(x)
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return torch.flatten(self.avgpool(x), 1)

  def forward(self, x):
    return self.fc(self.features(x))


def build(block="bottleneck", layers=(3, 4, 6, 3), seed=0, randomise=True, **kwargs):
  """A reference ResNet with random weights and, with ``randomise``, random BatchNorm affine
  parameters and running statistics (so eval mode is not the identity), in eval mode."""
  torch.manual_seed(seed)
  model = ResNet(Bottleneck if block == "bottleneck" else BasicBlock, list(layers), **kwargs)
  if randomise:
    randomise_batchnorm(model, seed)
  return model.eval()


def randomise_batchnorm(model, seed=0):
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        n = m.num_features
        m.weight.copy_(0.5 + torch.rand(n, generator=gen))
        m.bias.copy_(0.1 * torch.randn(n, generator=gen))
        m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
        m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
        m.num_batches_tracked.fill_(7)
  return model


def calibrate_batchnorm(model, images):
  """Running statistics set to those of ``images`` (torch's momentum 1 for one train-mode pass),
  as a trained network's are: activations stay O(1) through all the blocks of a deep random
  network, where random statistics let them grow to thousands (float32's ulp then exceeds the
  tolerance)."""
  norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
  for m in norms:
    m.momentum = 1.0
  with torch.no_grad():
    model.train()(nchw(images))
  for m in norms:
    m.momentum = 0.1
  return model.eval()


def nchw(images):
  """NHWC NumPy images -> an NCHW float32 torch tensor."""
  return torch.from_numpy(np.ascontiguousarray(np.asarray(images, np.float32).transpose(0, 3, 1, 2)))


def nhwc(tensor):
  """An NCHW torch tensor -> NHWC NumPy."""
  return tensor.detach().numpy().transpose(0, 2, 3, 1)


def run_blocks(blocks, h):
  """glajax's blocks of a stage (or any sequence of them) applied in turn, for step-by-step
  comparisons."""
  for block in blocks:
    h = block(h)
  return h
