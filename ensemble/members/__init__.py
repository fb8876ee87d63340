"""Member architectures, each family a `staged.StagedMember` (stem -> stages -> head). Importing this
package registers every one of them."""

from . import mlp, mobilenet, resnet, wrn  # noqa: F401
