"""The privacy protocol of one training run, in one place (the pipeline's Trainer executor drives it).

1. Plan (``dp_training.protocol.run_plan``; options in ``dp_training.protocol.options``): from public inputs
   only, the preprocessing release and the trainer kind's plan; their composition is the run's planned event.
2. Reserve, 3. train, 4. finish (``dp_training.protocol.session``): ``RunProtocol`` reserves the planned event
   against the source's budget (or refuses before any private row is used), charges what was actually released
   and builds the one :class:`~dp_training.guarantee.Guarantee` everything publishes; ``run_private_training``
   is the whole path, TFX-free.
Several runs at once (a study's grid): ``dp_training.protocol.studies`` (``combine_plans``, ``check_combined``,
``ledger_charge``).

Trainer kinds never open the ledger; nothing else computes the run's epsilon. This package re-exports the public
API: ``from dp_training.protocol import plan_run, RunProtocol, ...``.
"""
from dp_training.protocol.options import (DEFAULT_MIN_SLICE_SIZE, DEFAULT_PREPROCESSING_EPSILON,
                                          DEFAULT_TARGET_EPSILON, PREPROCESSING_SHARE, PlanError, PrivacyOptions)
from dp_training.protocol.run_plan import (RunPlan, deployment_epsilon, kind_config, not_covered, plan_run,
                                           planning_rows, resolve_privacy_args, simulation_statement)
from dp_training.protocol.session import PrivateRunResult, RunProtocol, run_private_training
from dp_training.protocol.studies import CombinedPlan, LedgerCharge, check_combined, combine_plans, ledger_charge

__all__ = ["RunPlan", "RunProtocol", "plan_run", "kind_config", "not_covered", "planning_rows", "resolve_privacy_args",
           "PlanError", "PrivacyOptions", "DEFAULT_TARGET_EPSILON", "DEFAULT_MIN_SLICE_SIZE",
           "DEFAULT_PREPROCESSING_EPSILON", "PREPROCESSING_SHARE", "deployment_epsilon", "simulation_statement",
           "combine_plans", "check_combined", "CombinedPlan", "ledger_charge", "LedgerCharge", "run_private_training",
           "PrivateRunResult"]
