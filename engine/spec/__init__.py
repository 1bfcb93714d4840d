"""Speculative decoding with P-EAGLE (reference/peagle.md).

config.py           head shape/settings from either published config.json; start-up checks
draft_layers.py     the head's decoder layers (engine attention: paged, or a dense mask)
head.py             PEagleHead: one forward pass proposes K drafts (+ q for sampling)
checkpoint.py       load/save the vLLM-native and speculators `peagle` layouts
rejection.py        rejection sampler: torch reference + dispatcher
rejection_kernel.py its Triton kernel
train.py            the parallel-drafting trainer (not imported when serving)
settings.py         the engine's `speculative_config` (vLLM's keys), checked at start-up
stats.py            drafted / accepted counters the engine core keeps

The runner's side (verify, commit, draft in one step) is engine/runner/spec_step.py.
"""
