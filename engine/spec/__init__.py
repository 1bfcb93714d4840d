"""Speculative decoding: the P-EAGLE parallel drafter (head, checkpoint loading,
trainer) and the rejection sampler that verifies drafts exactly."""
