"""OpenAI CLIP's ModifiedResNet image tower (RN50, RN101, RN50x4, RN50x16, RN50x64, or any geometry).

Module and parameter names follow OpenAI's `clip/model.py` so that original checkpoints map onto it by
prefix only. Differences from a torchvision ResNet: a stem of three 3x3 convolutions with an average
pool instead of one 7x7 convolution with a max pool, anti-aliased strided blocks (an average pool
before the strided 1x1 convolutions instead of stride-2 convolutions), and a QKV attention pool
instead of global average pooling.
"""

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_clip4cir import CLIP4CIRResNetConfig


class Bottleneck(nn.Module):
    """ResNet bottleneck; downsampling is an average pool after conv2 (and before the skip's 1x1 conv)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride)),
                        ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, stride=1, bias=False)),
                        ("1", nn.BatchNorm2d(planes * self.expansion)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.avgpool(out)
        out = self.bn3(self.conv3(out))
        return self.relu3(out + identity)


class AttentionPool2d(nn.Module):
    """One query (the mean of the grid) attends over the grid plus itself; returns `[N, output_dim]`."""

    def __init__(self, spatial_dim: int, embed_dim: int, num_heads: int, output_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spatial_dim**2 + 1, embed_dim) / embed_dim**0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(start_dim=2).permute(2, 0, 1)  # [N, C, H, W] -> [HW, N, C]
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)  # [HW + 1, N, C]
        x = x + self.positional_embedding[:, None, :].to(x.dtype)
        x, _ = F.multi_head_attention_forward(
            query=x[:1],
            key=x,
            value=x,
            embed_dim_to_check=x.shape[-1],
            num_heads=self.num_heads,
            q_proj_weight=self.q_proj.weight,
            k_proj_weight=self.k_proj.weight,
            v_proj_weight=self.v_proj.weight,
            in_proj_weight=None,
            in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
            bias_k=None,
            bias_v=None,
            add_zero_attn=False,
            dropout_p=0.0,
            out_proj_weight=self.c_proj.weight,
            out_proj_bias=self.c_proj.bias,
            use_separate_proj_weight=True,
            training=self.training,
            need_weights=False,
        )
        return x.squeeze(0)


class ModifiedResNet(nn.Module):
    """CLIP's ResNet image tower: `forward(pixel_values [N, 3, S, S]) -> image features [N, projection_dim]`.

    The features are unnormalized (the attention pool's output projection is CLIP's visual projection).
    """

    def __init__(self, config: CLIP4CIRResNetConfig):
        super().__init__()
        width = config.width
        self.conv1 = nn.Conv2d(config.num_channels, width // 2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)

        inplanes = width
        for stage, blocks in enumerate(config.layers):
            planes = width * 2**stage
            stride = 1 if stage == 0 else 2
            layer = [Bottleneck(inplanes, planes, stride)]
            inplanes = planes * Bottleneck.expansion
            layer += [Bottleneck(inplanes, planes) for _ in range(1, blocks)]
            self.add_module(f"layer{stage + 1}", nn.Sequential(*layer))

        self.attnpool = AttentionPool2d(
            config.image_size // 32, width * 32, config.num_attention_heads, config.projection_dim
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values.to(self.conv1.weight.dtype)
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        x = self.avgpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.attnpool(x)


__all__ = ["ModifiedResNet"]
