"""Parity of alignlab's other DPO loss types with TRL's ``DPOTrainer`` (TRL 1.16, a test-only dependency).

``sigmoid`` has its own test (tests/test_dpo_parity.py); this one covers TRL 1.16's 14 other loss types in three
runs per library, each a weighted combination (``loss_type=[...]``, ``loss_weights=[...]``, as TRL), with the
settings and rows of tests/test_dpo_parity.py (its helpers, same model, same 4 explicit-prompt rows, fp32, one
AdamW step at a constant learning rate, clipping at 1.0):

* run ``smoothing``, ``label_smoothing=0.1``: exo_pair, robust, aot, aot_unpaired, the loss types that read
  ``label_smoothing`` (exo_pair needs it > 0). ``sigmoid`` is left out of this run on purpose: TRL 1.16's
  ``sigmoid`` ignores ``label_smoothing`` while alignlab's applies it (conservative DPO, docs/losses.md), so
  the two agree only at 0, which tests/test_dpo_parity.py covers;
* run ``margin``: hinge, ipo, nca_pair, bco_pair, sppo_hard, sft;
* run ``anchored``: apo_zero, apo_down, discopop, sigmoid_norm.

The weights are distinct and chosen so that, at step 1 (where every log-ratio is 0), each loss pulls on the
chosen and rejected log-ratios about as hard as the others (e.g. sppo_hard's gradient is ``1 / beta`` = 10
per unit log-ratio, nca_pair's ``beta / 4``): a loss that alignlab got wrong then moves the update, and the
step-2 numbers, visibly instead of drowning in a larger term.

Compared, per run:

* step 1 (policy == reference): ``logps/chosen``, ``logps/rejected`` and ``loss`` to 1e-3 relative. The loss
  is the weighted sum of every loss at log-ratio 0 plus the batch's chosen NLL (``sft``): it checks the
  weights, the hyperparameters reaching each loss (``label_smoothing``, ``discopop_tau``) and sft's
  token mean;
* step 2 (after one AdamW update): ``loss``, the change of the loss from step 1, and ``rewards/margins`` to
  2e-2 relative (the tolerance of tests/test_dpo_parity.py). The loss change is the part of the step-2 loss
  that the update made; its constant part (e.g. sppo_hard's ``2 (1 / (2 beta))^2``) would otherwise hide
  it.
"""

from __future__ import annotations

import pytest

from tests.test_dpo_parity import (
    _embedded_rows, _run_alignlab, _run_trl, _two_step_failures, _two_step_report,
)

pytestmark = pytest.mark.integration

RUNS = {
    "smoothing": {
        "loss_type": ["exo_pair", "robust", "aot", "aot_unpaired"],
        "loss_weights": [1.0, 0.8, 1.2, 1.5],
        "label_smoothing": 0.1,
    },
    "margin": {
        "loss_type": ["hinge", "ipo", "nca_pair", "bco_pair", "sppo_hard", "sft"],
        "loss_weights": [0.5, 0.2, 2.0, 1.0, 0.005, 3.0],
    },
    "anchored": {
        "loss_type": ["apo_zero", "apo_down", "discopop", "sigmoid_norm"],
        "loss_weights": [2.0, 3.0, 0.3, 30.0],
        "discopop_tau": 0.05,
    },
}

# Every TRL 1.16 DPO loss type but sigmoid is in exactly one run.
TRL_LOSS_TYPES = {"sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"}


def test_runs_cover_every_trl_loss_type_once():
    covered = [t for run in RUNS.values() for t in run["loss_type"]]
    assert sorted(covered) == sorted(TRL_LOSS_TYPES - {"sigmoid"})
    for run in RUNS.values():
        assert len(set(run["loss_weights"])) == len(run["loss_weights"]) == len(run["loss_type"])


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory):
    return _embedded_rows(tmp_path_factory.mktemp("pairs"))


@pytest.mark.parametrize("run", list(RUNS))
def test_dpo_loss_combination_matches_trl_first_two_steps(run, rows_file, tmp_path):
    model_path, rows, data_path = rows_file
    loss_args = RUNS[run]
    ours = _run_alignlab(model_path, data_path, tmp_path / "alignlab", loss_args)
    theirs = _run_trl(model_path, rows, tmp_path / "trl", loss_args)
    report, ours_change, theirs_change = _two_step_report(ours, theirs)
    print(f"{run}: {loss_args}\n{report}")

    # Step 2 must differ visibly from step 1, or it would not test the update at all.
    assert abs(theirs[1]["rewards/margins"]) > 1e-3, f"step 2 margin too small to compare:\n{report}"
    assert abs(theirs_change) > 1e-3 * abs(theirs[0]["loss"]), f"step 2 loss barely moved:\n{report}"

    failures = _two_step_failures(ours, theirs, ours_change, theirs_change)
    assert not failures, f"{run}: " + "\n".join(failures) + "\nall values:\n" + report
