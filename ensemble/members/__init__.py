"""Member architectures. Importing this package registers every one of them."""

from . import (  # noqa: F401
    mlp,
    mobilenet,
    resnet,
    wrn,  # noqa: F401
)
