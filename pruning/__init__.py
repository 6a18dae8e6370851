"""Delta-parameter pruning (DARE, DAREx-q, DAREx-L2/AdamR, importance-based, structural, LoRA).

Pure functions on tensors: this package imports only torch.
"""

from pruning.methods import Method, prune_tensor
from pruning.sparse import SparseDelta, keep_mask, kept_indices

__all__ = ["Method", "SparseDelta", "keep_mask", "kept_indices", "prune_tensor"]
