"""Member architectures. Importing this package registers every one of them."""

from . import wrn  # noqa: F401
