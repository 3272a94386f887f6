"""Dataset readers, validators and mini-dataset generators."""
