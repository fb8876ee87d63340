"""The reference init std, written out independently of `core.plan_types.init_std` for the tests to compare
against: torchvision's / the WRN authors' Kaiming normal with fan_out for convolutions, PyTorch's default
U(+-1/sqrt(fan_in)) for linear layers."""

import math


def reference_std(shape: tuple[int, ...]) -> float:
    out, fan_in = shape[0], math.prod(shape[1:])
    if len(shape) == 4:  # (out, in, kh, kw)
        return math.sqrt(2.0 / (out * shape[2] * shape[3]))
    return math.sqrt(1.0 / (3.0 * fan_in))
