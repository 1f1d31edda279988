"""Pure loss functions: tensors in, tensors out. Imports only torch and tunesmith._core."""
from tunesmith.losses.cross_entropy import token_cross_entropy

__all__ = ["token_cross_entropy"]
