"""Channel plans of the built-in models, without torch: the config validator checks model.groups against them."""

from __future__ import annotations

# mobilenet-v1 adapted to 28x28: (out_channels, stride) of each depthwise-separable block after the stem.
# Only two stride-2 stages (28 -> 14 -> 7) so the last feature map is not smaller than the kernel.
V1_STEM = 32
V1_BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 1), (512, 1), (1024, 1)]

# mobilenet-v2 adapted to 28x28: (expansion t, out_channels c, repeats n, first stride s), as in Table 2
# of Sandler et al. 2018 with fewer repeats and strides so the 28x28 input ends at 7x7.
V2_STEM = 32
V2_BLOCKS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 1), (6, 64, 2, 2), (6, 96, 1, 1), (6, 160, 1, 1)]
V2_LAST = 640

MOBILENET_LIKE = [32, 32, 64, 64, 128]  # stem, dw1, pw1, dw2, pw2
CNN = [32, 64]


def scaled(channels: int, width: float, divisor: int = 8) -> int:
    """Width-multiplied channel count rounded to a multiple of ``divisor`` (as in the MobileNet papers)."""
    value = max(divisor, int(channels * width + divisor / 2) // divisor * divisor)
    if value < 0.9 * channels * width:  # never round down by more than 10%
        value += divisor
    return value


# Channel counts of every normalization layer of each model (GroupNorm groups must divide each); the registry
# (``models.registry``) points at these.


def mobilenet_like_channels(width: float = 1.0) -> list[int]:
    return list(MOBILENET_LIKE)


def cnn_channels(width: float = 1.0) -> list[int]:
    return list(CNN)


def no_norm_channels(width: float = 1.0) -> list[int]:
    """A model without norm layers (simple-cnn): model.norm has nothing to act on."""
    return []


def v1_channels(width: float = 1.0) -> list[int]:
    out = [scaled(V1_STEM, width)]
    c_in = out[0]
    for c, _ in V1_BLOCKS:
        c = scaled(c, width)
        out += [c_in, c]
        c_in = c
    return out


def v2_channels(width: float = 1.0) -> list[int]:
    out = [scaled(V2_STEM, width)]
    c_in = out[0]
    for t, c, n, _ in V2_BLOCKS:
        c = scaled(c, width)
        for _ in range(n):
            hidden = c_in * t
            out += ([hidden] if t != 1 else []) + [hidden, c]
            c_in = c
    out.append(scaled(V2_LAST, max(1.0, width)))
    return out
