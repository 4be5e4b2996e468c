"""The run-level privacy arguments, typed and validated once (dp_training.protocol.options.PrivacyOptions)."""
import json

import pytest

from dp_training.protocol import PlanError, PrivacyOptions, resolve_privacy_args


def test_defaults_and_round_trip_through_json():
    """What the TFX Trainer's custom_config carries (JSON) converts back to the same options."""
    opts = PrivacyOptions.from_mapping({"target_epsilon": "2.5", "delta": 1e-6, "budget_epsilon": 8,
                                        "allow_non_private": "true", "audit_canaries": 10.0, "label": 3,
                                        "anchors": [[4, "ab" * 32, "privacy.json"]], "accountant": None})
    assert opts.target_epsilon == 2.5 and opts.delta == 1e-6 and opts.budget_epsilon == 8.0
    assert opts.allow_non_private is True and opts.audit_canaries == 10 and opts.label == "3"
    assert opts.accountant == PrivacyOptions().accountant          # None means "not given": the default
    assert opts.anchors == ((4, "ab" * 32, "privacy.json"),)
    again = PrivacyOptions.from_mapping(json.loads(json.dumps(opts.to_mapping())))
    assert again == opts
    assert PrivacyOptions.from_mapping(opts) is opts
    assert resolve_privacy_args(None) == PrivacyOptions().to_mapping()


@pytest.mark.parametrize("args, match", [
    ({"target_epsilon": "abc"}, r"^target epsilon must be a number, got 'abc'; pass e.g. --target-epsilon 3$"),
    ({"target_epsilon": 0}, "target epsilon must be a finite number > 0, got 0"),
    ({"target_epsilon": float("inf")}, "target epsilon must be a finite number > 0"),
    ({"delta": 1.5}, r"delta must be in \(0, 1\), got 1.5; pass e.g. --delta 1e-5"),
    ({"delta": True}, "delta must be a number, got True"),
    ({"accountant": "moments"}, "unknown accountant 'moments'"),
    ({"preprocessing_epsilon": -1}, "preprocessing epsilon must be a finite number > 0"),
    ({"budget_epsilon": float("nan")}, "budget epsilon must be a finite number > 0"),
    ({"budget_delta": 0}, r"budget delta must be in \(0, 1\)"),
    ({"allow_non_private": "no"}, "allow_non_private must be true or false, got 'no'"),
    ({"audit_canaries": 2.5}, "audit_canaries must be a whole number >= 0, got 2.5"),
    ({"min_slice_size": -3}, "min_slice_size must be a whole number >= 0"),
    ({"ledger_anchor": "seven:abc"}, "ledger_anchor must be a receipt SEQ:HASH"),
    ({"anchors": ["12:abc"]}, r"each anchor is a receipt \(SEQ, HASH\[, where\]\)"),
    ({"ledger": 12}, "ledger must be a file path, got 12"),
    ({"epsilon": 3}, r"unknown privacy arguments \['epsilon'\]"),
])
def test_a_bad_value_is_one_plan_error_naming_it(args, match):
    with pytest.raises(PlanError, match=match) as info:
        resolve_privacy_args(args)
    assert "\n" not in str(info.value)


def test_a_truthy_string_never_allows_non_private_training():
    """``"no"`` (a TOML or JSON string) was read as True by ``bool(...)``: it would have allowed non-private
    training on a budgeted source. It is refused now."""
    with pytest.raises(PlanError):
        PrivacyOptions.from_mapping({"allow_non_private": "no"})
    assert PrivacyOptions.from_mapping({"allow_non_private": "false"}).allow_non_private is False


def test_options_are_frozen():
    opts = PrivacyOptions()
    with pytest.raises(Exception):
        opts.delta = 0.5
