"""Start-up checks of a head against its target and K."""

from types import SimpleNamespace

import pytest

from engine.spec.config import check_fits_target
from tests.engine.spec.helpers import tiny_config

TARGET = SimpleNamespace(hidden_size=24, vocab_size=61, num_hidden_layers=6)


def test_a_fitting_head_returns_its_taps():
    assert check_fits_target(tiny_config(num_speculative_tokens=4), TARGET, 4, 8) == [1, 2, 3]
    assert check_fits_target(tiny_config(aux_layer_ids=None), TARGET, 2, 8) == [2, 3, 3]


@pytest.mark.parametrize("cfg,target,k,match", [
    (tiny_config(), TARGET, 0, "between 1 and 8"),
    (tiny_config(), TARGET, 9, "between 1 and 8"),
    (tiny_config(), SimpleNamespace(hidden_size=32, vocab_size=61, num_hidden_layers=6), 2, "hidden states of size 24"),
    (tiny_config(), SimpleNamespace(hidden_size=24, vocab_size=64, num_hidden_layers=6), 2, "vocabulary"),
    (tiny_config(aux_layer_ids=[1, 2, 9]), TARGET, 2, "taps target layers"),
    (tiny_config(num_speculative_tokens=3), TARGET, 5, "trained to draft 3"),
])
def test_misfits_say_what_to_change(cfg, target, k, match):
    with pytest.raises(ValueError, match=match):
        check_fits_target(cfg, target, k, 8)


def test_bad_mask_id_in_config():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny_config(mask_token_id=61)


def test_drafts_per_batch_rule():
    from engine.spec.settings import SpecDecodeSettings
    base = {"method": "peagle", "model": "head", "num_speculative_tokens": 5}
    s = SpecDecodeSettings.from_dict({**base, "num_speculative_tokens_per_batch": [[8, 3], [32, 1]]})
    assert [s.drafts_at(b) for b in (1, 7, 8, 31, 32, 500)] == [5, 5, 3, 3, 1, 1]
    assert s.draft_counts == [5, 3, 1]
    assert SpecDecodeSettings.from_dict(base).drafts_at(10_000) == 5     # no rule: K at every batch


@pytest.mark.parametrize("rule,match", [
    ([[8, 0]], "each at least 1"),
    ([[8, 3], [8, 1]], "increasing"),
    ([[16, 3], [8, 1]], "increasing"),
    ([[1, 3]], "above 1"),
    ([[8, 6]], "below num_speculative_tokens=5"),
    ([[8, 2], [16, 3]], "shrink"),
    ([8, 3], "pairs"),
    ({"8": 3}, "pairs"),
])
def test_bad_drafts_per_batch_rule_says_what_to_change(rule, match):
    from engine.spec.settings import SpecDecodeSettings
    with pytest.raises(ValueError, match=match):
        SpecDecodeSettings.from_dict({"method": "peagle", "model": "head", "num_speculative_tokens": 5,
                                      "num_speculative_tokens_per_batch": rule})
