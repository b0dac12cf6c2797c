"""Networks: ResNet-32 (32x32 inputs), torchvision's ResNet-18 (224x224), and an incremental
classifier head that grows by k classes while keeping the old rows.

The head is linear unless a method asks for LUCIR's cosine classifier; a method may also add
BiC's bias correction on the logits. Both are part of the network (its forward, its weights
and its description), so a saved version predicts as it was trained, and a version saved
without them (every version before they existed) loads as a plain linear head."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import load_file, save_file
from torch import nn

from learner.core.config import ModelConfig

FORMAT = "bsce-serve/model-1"


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            # 1x1 projection (option B), as in LUCIR's CIFAR ResNet.
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) of He et al. for 32x32 inputs: 3 stages of n basic blocks, 16/32/64
    channels. n=5 is ResNet-32; n=1 (ResNet-8) keeps tests fast."""

    def __init__(self, blocks_per_stage: int, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        layers: list[nn.Module] = []
        in_planes = 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(blocks_per_stage):
                layers.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.stages = nn.Sequential(*layers)
        self.feature_dim = 64

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def _resnet18(in_channels: int) -> nn.Module:
    net = torchvision.models.resnet18(weights=None)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    net.fc = nn.Identity()
    net.feature_dim = 512
    return net


def build_backbone(config: ModelConfig) -> nn.Module:
    if config.backbone == "resnet32":
        return CifarResNet(5, config.in_channels)
    if config.backbone == "resnet8":
        return CifarResNet(1, config.in_channels)
    return _resnet18(config.in_channels)


def init_parameters(module: nn.Module, generator: torch.Generator) -> None:
    """Initialise from an explicit generator so that the seed covers the weights too."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(
                m.weight, mode="fan_out", nonlinearity="relu", generator=generator
            )
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.weight.numel() > 0:
            _init_linear_rows(m.weight, m.bias, generator)
        elif isinstance(m, CosineHead) and m.weight.numel() > 0:
            _init_linear_rows(m.weight, None, generator)


def _init_linear_rows(weight: torch.Tensor, bias: torch.Tensor | None, g: torch.Generator) -> None:
    # torch's default Linear init (kaiming_uniform with a=sqrt(5)), drawn from g.
    bound = 1.0 / math.sqrt(weight.shape[1])
    with torch.no_grad():
        weight.uniform_(-bound, bound, generator=g)
        if bias is not None:
            bias.uniform_(-bound, bound, generator=g)


class CosineHead(nn.Module):
    """LUCIR's classifier: ``sigma * cos(w_j, f)``, one learnt scale for all classes.

    Logits lie in ``[-|sigma|, |sigma|]`` and do not change when the features are scaled, so
    no class can win by the norm of its weight row (the bias LUCIR removes)."""

    def __init__(self, in_features: int, out_features: int, sigma: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.sigma = nn.Parameter(torch.tensor(float(sigma)))

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sigma * F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))


class BiasCorrection(nn.Module):
    """BiC's bias layer, as a pair per class: ``logits * alpha + beta``.

    Buffers, not parameters: the training loop never moves them. BiC's stage fits one pair for
    the classes of its step and writes it into their entries (identity elsewhere), so the
    correction is saved with the weights and applied at inference."""

    alpha: torch.Tensor
    beta: torch.Tensor

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("alpha", torch.ones(num_classes))
        self.register_buffer("beta", torch.zeros(num_classes))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits * self.alpha + self.beta

    def grow(self, num_classes: int) -> None:
        extra = num_classes - self.alpha.shape[0]
        self.alpha = torch.cat([self.alpha, self.alpha.new_ones(extra)])
        self.beta = torch.cat([self.beta, self.beta.new_zeros(extra)])


HEADS = ("linear", "cosine")


class IncrementalNet(nn.Module):
    """A backbone and a head whose rows are the classes seen so far, in label-map order."""

    def __init__(
        self,
        config: ModelConfig,
        num_classes: int = 0,
        *,
        head: str = "linear",
        bias_correction: bool = False,
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; known: {', '.join(HEADS)}")
        self.config = config
        self.backbone = build_backbone(config)
        self.feature_dim: int = self.backbone.feature_dim
        self.head: nn.Linear | CosineHead
        with warnings.catch_warnings():
            # Version 0 has no classes yet: an empty head is expected, not a mistake.
            warnings.filterwarnings("ignore", "Initializing zero-element tensors")
            if head == "cosine":
                self.head = CosineHead(self.feature_dim, num_classes)
            else:
                self.head = nn.Linear(self.feature_dim, num_classes)
        self.bias_correction = BiasCorrection(num_classes) if bias_correction else None

    @classmethod
    def create(
        cls, config: ModelConfig, generator: torch.Generator, num_classes: int = 0
    ) -> IncrementalNet:
        net = cls(config, num_classes)
        init_parameters(net, generator)
        return net

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    @property
    def head_kind(self) -> str:
        return "cosine" if isinstance(self.head, CosineHead) else "linear"

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        out = self.head(features)
        return out if self.bias_correction is None else self.bias_correction(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.backbone(x))

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.backbone(x)
        return self.logits(feats), feats

    def use_cosine_head(self, sigma: float) -> None:
        """Switch to LUCIR's cosine head (once; later calls keep the learnt one). The rows'
        directions carry over, the linear biases are dropped, ``sigma`` starts the scale."""
        if isinstance(self.head, CosineHead):
            return
        head = CosineHead(self.feature_dim, self.num_classes, sigma).to(self.head.weight)
        with torch.no_grad():
            head.weight.copy_(self.head.weight)
        self.head = head

    def add_bias_correction(self) -> None:
        """Add BiC's bias layer, identity for every class (once)."""
        if self.bias_correction is None:
            self.bias_correction = BiasCorrection(self.num_classes).to(self.head.weight.device)

    def grow(self, num_classes: int, generator: torch.Generator) -> None:
        """Extend the head to ``num_classes`` rows; old rows are kept bit for bit."""
        old = self.head
        if num_classes < old.out_features:
            raise ValueError(f"cannot shrink the head from {old.out_features} to {num_classes}")
        if num_classes == old.out_features:
            return
        if self.bias_correction is not None:
            self.bias_correction.grow(num_classes)
        if isinstance(old, CosineHead):
            self._grow_cosine(old, num_classes, generator)
            return
        new = nn.Linear(self.feature_dim, num_classes).to(old.weight.device, old.weight.dtype)
        with torch.no_grad():
            k = old.out_features
            fresh_w = torch.empty(num_classes - k, self.feature_dim)
            fresh_b = torch.empty(num_classes - k)
            _init_linear_rows(fresh_w, fresh_b, generator)
            new.weight.copy_(torch.cat([old.weight.detach().cpu(), fresh_w]).to(new.weight))
            new.bias.copy_(torch.cat([old.bias.detach().cpu(), fresh_b]).to(new.bias))
        self.head = new

    def _grow_cosine(self, old: CosineHead, num_classes: int, generator: torch.Generator) -> None:
        # The same draws as a linear head's rows (bias included), so the random stream after
        # a step does not depend on the head.
        k = old.out_features
        fresh_w = torch.empty(num_classes - k, self.feature_dim)
        _init_linear_rows(fresh_w, torch.empty(num_classes - k), generator)
        new = CosineHead(self.feature_dim, num_classes).to(old.weight)
        with torch.no_grad():
            new.weight.copy_(torch.cat([old.weight.detach().cpu(), fresh_w]).to(new.weight))
            new.sigma.copy_(old.sigma)
        self.head = new

    # --- persistence: safetensors weights, JSON metadata; never pickle -----------------------

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}

    def describe(self) -> dict[str, object]:
        # The head and the bias layer are named only when they differ from the plain linear
        # head, so a linear version's description is what it was before they existed.
        return {
            "format": FORMAT,
            "model_config": self.config.model_dump(mode="json"),
            "num_classes": self.num_classes,
            **({"head": "cosine"} if self.head_kind == "cosine" else {}),
            **({"bias_correction": True} if self.bias_correction is not None else {}),
        }

    @classmethod
    def from_tensors(
        cls, tensors: Mapping[str, torch.Tensor], description: Mapping[str, object]
    ) -> IncrementalNet:
        if description.get("format") != FORMAT:
            raise ValueError(f"unknown model format {description.get('format')!r}")
        config = ModelConfig.model_validate(description["model_config"])
        net = cls(
            config,
            int(description["num_classes"]),  # type: ignore[arg-type]
            head=str(description.get("head", "linear")),
            bias_correction=bool(description.get("bias_correction", False)),
        )
        net.load_state_dict(dict(tensors), strict=True)
        return net


def save_model(net: IncrementalNet, path: Path, extra: Mapping[str, object] | None = None) -> None:
    """Weights as safetensors; metadata (model config, class count, ``extra``) as JSON in the
    safetensors header, so one file is self-describing."""
    meta = {"description": json.dumps(net.describe()), "extra": json.dumps(dict(extra or {}))}
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(net.to_tensors(), str(tmp), metadata=meta)
    tmp.replace(path)


def load_model(path: Path) -> tuple[IncrementalNet, dict[str, object]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    tensors = load_file(str(path))
    net = IncrementalNet.from_tensors(tensors, json.loads(meta["description"]))
    return net, json.loads(meta.get("extra", "{}"))
