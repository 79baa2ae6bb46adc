"""Tensor parallelism over torch.distributed (issue 39): each rank holds 1/N of the attention heads and of
the MLP's columns and 1/N of the LM head's vocabulary.

- group.py: the process group (torchrun's, or the script's) and the two collectives the decoder needs
- shard.py: which heads, columns and vocabulary rows a rank holds, and the rank's slice of the model
"""
