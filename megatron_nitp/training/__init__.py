"""The slim training loop megatron-core does not ship (it has no ``megatron.training``)."""
