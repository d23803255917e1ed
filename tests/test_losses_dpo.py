"""Preference losses against numbers worked out by hand, the registry, and TRL 1.16's own code."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from alignlab.losses.dpo import (
    PREFERENCE_LOSSES,
    PairLogps,
    combined_reward_kind,
    get_preference_loss,
    preference_loss,
    preference_metrics,
    register_preference_loss,
    sigmoid_loss,
)

# Constants used in the working below:
#   log sigmoid(1) = -log(1 + e^-1) = -0.3132616875     log sigmoid(-1) = -1.3132616875
#   log sigmoid(0.5) = -0.4740769842                    log sigmoid(-0.5) = -0.9740769842
#   sigmoid(1) = 0.7310585786   sigmoid(0.5) = 0.6224593312   sigmoid(-0.5) = 0.3775406688   log 2 = 0.6931471806
LOG2 = math.log(2)


def logratio_pair(chosen, rejected, chosen_lengths=None, rejected_lengths=None) -> PairLogps:
    """A PairLogps whose log-ratios are the given numbers (reference log-probs 0)."""
    chosen, rejected = torch.tensor(chosen), torch.tensor(rejected)
    return PairLogps(
        chosen_logps=chosen,
        rejected_logps=rejected,
        chosen_lengths=torch.ones_like(chosen) if chosen_lengths is None else torch.tensor(chosen_lengths),
        rejected_lengths=torch.ones_like(rejected) if rejected_lengths is None else torch.tensor(rejected_lengths),
        ref_chosen_logps=torch.zeros_like(chosen),
        ref_rejected_logps=torch.zeros_like(rejected),
    )


def logp_pair(chosen, rejected, chosen_lengths, rejected_lengths) -> PairLogps:
    """A reference-free PairLogps."""
    return PairLogps(
        chosen_logps=torch.tensor(chosen),
        rejected_logps=torch.tensor(rejected),
        chosen_lengths=torch.tensor(chosen_lengths),
        rejected_lengths=torch.tensor(rejected_lengths),
    )


def loss(name, pair, **hyperparameters):
    return preference_loss([name], pair, **hyperparameters).tolist()


# Shared inputs: log-ratios of two pairs. h = chosen - rejected = [2, 0]; with beta = 0.5, beta * h = [1, 0],
# beta * chosen = [0.5, 0], beta * rejected = [-0.5, 0].
PAIR = logratio_pair([1.0, 0.0], [-1.0, 0.0])


# --- the four original losses (same numbers as before the registry) ---------------------------------------


def test_sigmoid_matches_hand_values():
    # pair 0: -log sigmoid(1) = 0.3132616875; pair 1: -log sigmoid(0) = log 2
    assert loss("sigmoid", PAIR, beta=0.5) == pytest.approx([0.31326168751822286, LOG2], rel=1e-6)


def test_sigmoid_label_smoothing_is_conservative_dpo():
    # e = 0.1, pair 0: 0.9 * log(1 + e^-1) + 0.1 * log(1 + e^1)
    #   = 0.9 * 0.3132616875 + 0.1 * 1.3132616875 = 0.2819355188 + 0.1313261688 = 0.4132616875
    # pair 1: both terms are log 2.
    assert loss("sigmoid", PAIR, beta=0.5, label_smoothing=0.1) == pytest.approx([0.4132616875182229, LOG2], rel=1e-6)


def test_robust_is_unbiased_flip_correction():
    # e = 0.1, pair 0: (0.9 * 0.3132616875 - 0.1 * 1.3132616875) / 0.8 = 0.1506093500 / 0.8 = 0.1882616875
    # pair 1: (0.9 - 0.1) * log 2 / 0.8 = log 2
    assert loss("robust", PAIR, beta=0.5, label_smoothing=0.1) == pytest.approx([0.18826168751822286, LOG2], rel=1e-6)
    # With no flips, robust DPO is DPO.
    assert loss("robust", PAIR, beta=0.5) == loss("sigmoid", PAIR, beta=0.5)


def test_hinge():
    # beta * h = [1, 0, -1] -> relu(1 - [1, 0, -1]) = [0, 1, 2]
    assert loss("hinge", logratio_pair([1.0, 0.0, -1.0], [-1.0, 0.0, 1.0]), beta=0.5) == [0.0, 1.0, 2.0]


def test_ipo_uses_length_averaged_logratios():
    # chosen 4 nats over 2 tokens = 2 per token; rejected -2 nats over 4 tokens = -0.5 per token
    # h = 2.5; 1 / (2 * beta) = 1 for beta = 0.5; (2.5 - 1)^2 = 2.25
    pair = logratio_pair([4.0], [-2.0], chosen_lengths=[2.0], rejected_lengths=[4.0])
    assert loss("ipo", pair, beta=0.5) == pytest.approx([2.25])


# --- TRL 1.16's other DPO losses ----------------------------------------------------------------------


def test_exo_pair():
    # e = 0.1; q_w = sigmoid(beta h), q_l = 1 - q_w; loss = q_w (log q_w - log 0.9) + q_l (log q_l - log 0.1)
    # pair 0 (beta h = 1): 0.7310585786 * (-0.3132616875 + 0.1053605157) = -0.1519879352
    #                    + 0.2689414214 * (-1.3132616875 + 2.3025850930) =  0.2660700429  -> 0.1140821077
    # pair 1 (beta h = 0): KL([.5, .5] || [.9, .1]) = 0.5 log(0.5/0.9) + 0.5 log(0.5/0.1) = log(5/3) = 0.5108256238
    assert loss("exo_pair", PAIR, beta=0.5, label_smoothing=0.1) == pytest.approx(
        [0.11408210766749785, math.log(5 / 3)], rel=1e-6
    )
    with pytest.raises(ValueError, match="label_smoothing"):  # TRL also refuses e = 0 (log 0)
        preference_loss(["exo_pair"], PAIR, beta=0.5, label_smoothing=0.0)


def test_nca_pair():
    # pair 0: -log sigmoid(0.5) - 0.5 log sigmoid(-0.5) - 0.5 log sigmoid(0.5)   (beta * rejected = -0.5)
    #       = 0.4740769842 + 0.4870384921 + 0.2370384921 = 1.1981539684
    # pair 1: log 2 + 0.5 log 2 + 0.5 log 2 = 2 log 2
    assert loss("nca_pair", PAIR, beta=0.5) == pytest.approx([1.1981539683602134, 2 * LOG2], rel=1e-6)


def test_bco_pair():
    # pair 0: -log sigmoid(0.5) - log sigmoid(-(-0.5)) = 2 * 0.4740769842 = 0.9481539684; pair 1: 2 log 2
    assert loss("bco_pair", PAIR, beta=0.5) == pytest.approx([0.9481539683602134, 2 * LOG2], rel=1e-6)


def test_sppo_hard():
    # 1 / (2 beta) = 1; pair 0: (1 - 1)^2 + (-1 + 1)^2 = 0; pair 1: (0 - 1)^2 + (0 + 1)^2 = 2
    assert loss("sppo_hard", PAIR, beta=0.5) == [0.0, 2.0]


def test_aot_sorts_margins_over_the_batch():
    # policy c - r = [-1 - -2, -3 - -2] = [1, -1] -> sorted [-1, 1]
    # reference    = [-2 - -1, -2 - -2] = [-1, 0] -> sorted [-1, 0]
    # d = [0, 1]; beta d = [0, 0.5] -> [log 2, -log sigmoid(0.5) = 0.4740769842]
    # (pairwise DPO would see h = [2, -1] instead)
    pair = PairLogps(
        chosen_logps=torch.tensor([-1.0, -3.0]),
        rejected_logps=torch.tensor([-2.0, -2.0]),
        chosen_lengths=torch.ones(2),
        rejected_lengths=torch.ones(2),
        ref_chosen_logps=torch.tensor([-2.0, -2.0]),
        ref_rejected_logps=torch.tensor([-1.0, -2.0]),
    )
    assert loss("aot", pair, beta=0.5) == pytest.approx([LOG2, 0.4740769841801067], rel=1e-6)


def test_aot_unpaired_sorts_each_side():
    # chosen log-ratios [2, -1] -> sorted [-1, 2]; rejected [0, 1] -> sorted [0, 1]; d = [-1, 1]; beta d = [-0.5, 0.5]
    # e = 0: [0.9740769842, 0.4740769842]
    # e = 0.1: [0.9 * 0.9740769842 + 0.1 * 0.4740769842, 0.9 * 0.4740769842 + 0.1 * 0.9740769842]
    #        = [0.8766692858 + 0.0474076984, 0.4266692858 + 0.0974076984] = [0.9240769842, 0.5240769842]
    pair = logratio_pair([2.0, -1.0], [0.0, 1.0])
    assert loss("aot_unpaired", pair, beta=0.5) == pytest.approx([0.9740769841801067, 0.4740769841801067], rel=1e-6)
    assert loss("aot_unpaired", pair, beta=0.5, label_smoothing=0.1) == pytest.approx(
        [0.9240769841801066, 0.5240769841801067], rel=1e-6
    )


def test_apo_zero_and_down():
    # apo_zero pair 0: 1 - sigmoid(0.5) + sigmoid(-0.5) = 1 - 0.6224593312 + 0.3775406688 = 0.7550813376
    #          pair 1: 1 - 0.5 + 0.5 = 1
    # apo_down pair 0: sigmoid(0.5) + 1 - sigmoid(1) = 0.6224593312 + 1 - 0.7310585786 = 0.8914007526
    #          pair 1: 0.5 + 1 - 0.5 = 1
    assert loss("apo_zero", PAIR, beta=0.5) == pytest.approx([0.7550813375962908, 1.0], rel=1e-6)
    assert loss("apo_down", PAIR, beta=0.5) == pytest.approx([0.8914007525718496, 1.0], rel=1e-6)


def test_discopop():
    # z = beta h; m = sigmoid(z / tau); loss = (1 - m) (-log sigmoid z) + m e^-z
    # tau = 1, pair 0 (z = 1): m = 0.7310585786, 1 - m = 0.2689414214 = sigmoid(1) e^-1, so
    #   loss = 0.2689414214 * (0.3132616875 + 1) = 0.3531904649
    # pair 1 (z = 0): m = 0.5 -> 0.5 log 2 + 0.5 = 0.8465735903 (for any tau)
    assert loss("discopop", PAIR, beta=0.5, discopop_tau=1.0) == pytest.approx(
        [0.3531904648719093, 0.5 * LOG2 + 0.5], rel=1e-6
    )
    # tau = 0.05 (TRL's default): m = sigmoid(20) ~ 1 - 2.06e-9, so pair 0 is ~ e^-1 = 0.3678794411
    assert loss("discopop", PAIR, beta=0.5, discopop_tau=0.05)[0] == pytest.approx(0.3678794410588668, rel=1e-6)


def test_sigmoid_norm():
    # chosen 3 nats / 2 tokens = 1.5, rejected -2 nats / 4 tokens = -0.5; h_avg = 2; beta h_avg = 1
    # -> -log sigmoid(1) = 0.3132616875
    pair = logratio_pair([3.0], [-2.0], chosen_lengths=[2.0], rejected_lengths=[4.0])
    assert loss("sigmoid_norm", pair, beta=0.5) == pytest.approx([0.31326168751822286], rel=1e-6)


def test_sft_is_the_batch_token_mean_nll_of_chosen():
    # -(-4 + -2) / (2 + 4) = 1, repeated for each pair; the rejected side and the reference are not read
    pair = logp_pair([-4.0, -2.0], [-9.0, -9.0], [2.0, 4.0], [1.0, 1.0])
    assert loss("sft", pair) == [1.0, 1.0]


# --- reference-free losses ----------------------------------------------------------------------------


def test_simpo():
    # beta = 2, gamma = 0.5
    # pair 0: chosen -2 / 2 = -1, rejected -6 / 3 = -2; z = 2 * 1 - 0.5 = 1.5 -> log(1 + e^-1.5) = 0.2014132780
    # pair 1: chosen -3 / 3 = -1, rejected -1 / 1 = -1; z = 0 - 0.5 -> -log sigmoid(-0.5) = 0.9740769842
    pair = logp_pair([-2.0, -3.0], [-6.0, -1.0], [2.0, 3.0], [3.0, 1.0])
    assert loss("simpo", pair, beta=2.0, simpo_gamma=0.5) == pytest.approx(
        [0.2014132779827524, 0.9740769841801067], rel=1e-6
    )


def test_cpo_adds_cpo_alpha_times_chosen_nll():
    # beta = 0.5: z = 0.5 * (c - r) = 0.5 * ([-2, -4] - [-4, -4]) = [1, 0] -> [0.3132616875, log 2]
    # NLL = -(-2 + -4) / (2 + 2) = 1.5 per chosen token; cpo_alpha = 1 -> [1.8132616875, 2.1931471806]
    pair = logp_pair([-2.0, -4.0], [-4.0, -4.0], [2.0, 2.0], [2.0, 2.0])
    assert loss("cpo", pair, beta=0.5, cpo_alpha=1.0) == pytest.approx([1.8132616875182228, LOG2 + 1.5], rel=1e-6)
    assert loss("cpo", pair, beta=0.5, cpo_alpha=0.0) == pytest.approx([0.31326168751822286, LOG2], rel=1e-6)


def test_orpo():
    # chosen: -1.3862943611 over 2 tokens -> a = log 0.5 per token: odds 0.5 / 0.5 = 1, log odds 0
    # rejected: -1.3862943611 over 1 token -> b = log 0.25: odds 0.25 / 0.75 = 1/3, log odds -log 3
    # log_odds = log 3; log sigmoid(log 3) = log(3/4) = -0.2876820725
    # NLL = 1.3862943611 / 2 = log 2; loss = log 2 + 0.1 * 0.2876820725 = 0.7219153878
    pair = logp_pair([2 * math.log(0.5)], [math.log(0.25)], [2.0], [1.0])
    assert loss("orpo", pair, beta=0.1) == pytest.approx([0.7219153878051234], rel=1e-6)


# --- the registry -------------------------------------------------------------------------------------

TRL_DPO_LOSS_TYPES = [
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
    "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
]  # fmt: skip


def test_registry_holds_trl_dpo_losses_and_reference_free_ones():
    assert set(PREFERENCE_LOSSES) == set(TRL_DPO_LOSS_TYPES) | {"simpo", "cpo", "orpo"}
    reference_free = {name for name, spec in PREFERENCE_LOSSES.items() if not spec.needs_reference}
    assert reference_free == {"sft", "simpo", "cpo", "orpo"}
    assert all(spec.source for spec in PREFERENCE_LOSSES.values())
    assert get_preference_loss("simpo").hyperparameters == ("beta", "simpo_gamma", "label_smoothing", "alpha")
    assert get_preference_loss("simpo").required_hyperparameters == ("beta", "simpo_gamma")
    assert get_preference_loss("orpo").reward_kind == "mean_logp"
    assert get_preference_loss("cpo").reward_kind == "logp"


def test_weighted_combination_is_trls_multi_loss():
    # sigmoid [0.3132616875, log 2] + 0.5 * sft; sft on these log-probs: -(1 + 0) / (1 + 1) = -0.5 per pair
    # -> [0.3132616875 - 0.25, log 2 - 0.25]
    combined = preference_loss(["sigmoid", "sft"], PAIR, loss_weights=[1.0, 0.5], beta=0.5, discopop_tau=0.05)
    assert combined.tolist() == pytest.approx([0.31326168751822286 - 0.25, LOG2 - 0.25], rel=1e-6)
    # weights default to 1; a bare string is one name
    assert preference_loss("sigmoid", PAIR, beta=0.5).tolist() == loss("sigmoid", PAIR, beta=0.5)


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown preference loss_type 'nope'; choose from sigmoid, hinge"):
        get_preference_loss("nope")
    with pytest.raises(ValueError, match="loss_weights has 1 values for 2"):
        preference_loss(["sigmoid", "hinge"], PAIR, loss_weights=[1.0], beta=0.5)
    with pytest.raises(ValueError, match="needs hyperparameter.*discopop_tau"):
        preference_loss(["discopop"], PAIR, beta=0.5)
    with pytest.raises(ValueError, match="needs hyperparameter.*beta"):
        preference_loss(["hinge"], PAIR)
    no_ref = logp_pair([-1.0], [-2.0], [1.0], [1.0])
    with pytest.raises(ValueError, match="'sigmoid' needs reference"):
        preference_loss(["sigmoid"], no_ref, beta=0.5)
    with pytest.raises(ValueError, match="no reference"):
        no_ref.chosen_logratios  # noqa: B018
    with pytest.raises(ValueError, match="same shape"):
        logp_pair([-1.0, -2.0], [-2.0], [1.0, 1.0], [1.0])
    with pytest.raises(ValueError, match="both"):
        PairLogps(torch.zeros(1), torch.zeros(1), torch.ones(1), torch.ones(1), ref_chosen_logps=torch.zeros(1))
    with pytest.raises(ValueError, match="beta"):
        preference_loss(["sigmoid"], PAIR, beta=-1.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss(["robust"], PAIR, beta=0.1, label_smoothing=0.5)
    with pytest.raises(ValueError, match="already registered"):
        register_preference_loss("sigmoid")(sigmoid_loss)

    def wrong(pair, *, beta):
        return pair.chosen_logps

    with pytest.raises(ValueError, match="declares"):
        register_preference_loss("wrong", hyperparameters=("beta", "label_smoothing"))(wrong)
    assert "wrong" not in PREFERENCE_LOSSES


def test_combined_reward_kind():
    assert combined_reward_kind(["sft", "sigmoid"]) == "logratio"  # TRL's DPOTrainer logs log-ratio rewards
    assert combined_reward_kind(["simpo", "sft"]) == "mean_logp"
    assert combined_reward_kind(["cpo"]) == "logp"


# --- metrics ------------------------------------------------------------------------------------------


def test_metrics_count_only_strictly_positive_margins():
    # rewards: chosen 0.5 * [1, 0, 2] = [0.5, 0, 1]; rejected 0.5 * [-1, 0, 3] = [-0.5, 0, 1.5]
    # margins [1, 0, -0.5]; accuracies [1, 0 (tie), 0]
    m = preference_metrics(logratio_pair([1.0, 0.0, 2.0], [-1.0, 0.0, 3.0]), beta=0.5, reward_kind="logratio")
    assert m["rewards/chosen"].tolist() == [0.5, 0.0, 1.0]
    assert m["rewards/rejected"].tolist() == [-0.5, 0.0, 1.5]
    assert m["rewards/margins"].tolist() == [1.0, 0.0, -0.5]
    assert m["rewards/accuracies"].tolist() == [1.0, 0.0, 0.0]
    assert m["logps/chosen"].tolist() == [1.0, 0.0, 2.0]  # reference 0 here, so log-probs = log-ratios


def test_reference_free_metrics():
    pair = logp_pair([-2.0, -3.0], [-6.0, -1.0], [2.0, 3.0], [3.0, 1.0])
    # logp: beta * sum: chosen 0.5 * [-2, -3] = [-1, -1.5]; rejected [-3, -0.5]; margins [2, -1]
    m = preference_metrics(pair, beta=0.5, reward_kind="logp")
    assert m["rewards/chosen"].tolist() == [-1.0, -1.5]
    assert m["rewards/margins"].tolist() == [2.0, -1.0]
    assert m["rewards/accuracies"].tolist() == [1.0, 0.0]
    assert m["logps/rejected"].tolist() == [-6.0, -1.0]
    # mean_logp: per token [-1, -1] and [-2, -1]; beta 2 -> chosen [-2, -2], rejected [-4, -2]; tie counts wrong
    m = preference_metrics(pair, beta=2.0, reward_kind="mean_logp")
    assert m["rewards/chosen"].tolist() == [-2.0, -2.0]
    assert m["rewards/rejected"].tolist() == [-4.0, -2.0]
    assert m["rewards/accuracies"].tolist() == [1.0, 0.0]
    assert m["logps/chosen"].tolist() == [-1.0, -1.0]  # TRL's SimPO / ORPO log the per-token means
    with pytest.raises(ValueError, match="no reference"):
        preference_metrics(pair, beta=0.5, reward_kind="logratio")
    with pytest.raises(ValueError, match="reward_kind"):
        preference_metrics(pair, beta=0.5, reward_kind="nope")


def test_gradient_pushes_chosen_up():
    chosen = torch.zeros(1, requires_grad=True)
    rejected = torch.zeros(1, requires_grad=True)
    pair = PairLogps(chosen, rejected, torch.ones(1), torch.ones(1), torch.zeros(1), torch.zeros(1))
    preference_loss(["sigmoid"], pair, beta=0.1).sum().backward()
    # d/dc of -log sigmoid(beta (c - r)) at 0 = -beta * sigmoid(0) = -0.05
    assert chosen.grad.item() == pytest.approx(-0.05)
    assert rejected.grad.item() == pytest.approx(0.05)


# --- against TRL 1.16's code on random tensors --------------------------------------------------------


def _trl():
    trl = pytest.importorskip("trl", reason="trl (test-only dependency: pip install -e '.[test]') is not installed")
    if trl.__version__ != "1.16.0":
        pytest.skip(f"these checks call TRL 1.16.0 internals; installed {trl.__version__}")
    return trl


def _random_batch(seed: int, batch: int = 6, width: int = 9):
    """Per-token log-probs of B chosen and B rejected completions (TRL's [chosen; rejected] layout).

    Returns TRL's inputs (completion_mask (2B, width) with column 0 a prompt token, per-token log-probs
    (2B, width - 1) zero outside the completion, reference sums) and the PairLogps built from them.
    """
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width, (2 * batch,), generator=g)
    positions = torch.arange(width)
    completion_mask = ((positions >= 1) & (positions <= lengths[:, None])).long()
    per_token = -torch.rand(2 * batch, width - 1, generator=g, dtype=torch.float64) * 2 * completion_mask[:, 1:]
    ref = per_token.sum(1) + torch.randn(2 * batch, generator=g, dtype=torch.float64)
    logps = per_token.sum(1)
    pair = PairLogps(
        chosen_logps=logps[:batch],
        rejected_logps=logps[batch:],
        chosen_lengths=lengths[:batch].double(),
        rejected_lengths=lengths[batch:].double(),
        ref_chosen_logps=ref[:batch],
        ref_rejected_logps=ref[batch:],
    )
    return completion_mask, per_token, ref[:batch], ref[batch:], pair


def _trl_dpo_loss(loss_types, loss_weights, completion_mask, per_token, ref_chosen, ref_rejected, **hp):
    """TRL's ``DPOTrainer._compute_loss`` run on given log-probs: a stand-in model returns them."""
    from trl import DPOTrainer

    n, width = completion_mask.shape
    outputs = SimpleNamespace(
        log_probs=per_token,
        entropy=torch.zeros(n, width - 1),
        mean_logits=torch.zeros(n, width - 1),
        is_top1=torch.zeros(n, width - 1, dtype=torch.bool),
    )
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=accelerator,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=list(loss_types),
        loss_weights=list(loss_weights),
        beta=hp["beta"],
        label_smoothing=hp.get("label_smoothing", 0.0),
        args=SimpleNamespace(discopop_tau=hp.get("discopop_tau", 0.05)),
        use_weighting=False,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(n, width, dtype=torch.long),
        "attention_mask": torch.ones(n, width, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    loss = DPOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, False)
    return loss, trainer._metrics["train"]


@pytest.mark.parametrize("loss_type", TRL_DPO_LOSS_TYPES)
def test_each_dpo_loss_matches_trl(loss_type):
    _trl()
    completion_mask, per_token, ref_chosen, ref_rejected, pair = _random_batch(seed=len(loss_type))
    # label_smoothing 0 for sigmoid: TRL 1.16 ignores it there, alignlab applies cDPO
    hp = {"beta": 0.3, "label_smoothing": 0.0 if loss_type == "sigmoid" else 0.1, "discopop_tau": 0.5}
    theirs, trl_metrics = _trl_dpo_loss([loss_type], [1.0], completion_mask, per_token, ref_chosen, ref_rejected, **hp)
    ours = preference_loss([loss_type], pair, **hp)
    # exo_pair: TRL takes log(e) and log(1 - e) in float32 (torch.tensor(e)); alignlab in the inputs' dtype
    rel = 1e-6 if loss_type == "exo_pair" else 1e-9
    assert ours.mean().item() == pytest.approx(theirs.item(), rel=rel, abs=1e-12)
    metrics = preference_metrics(pair, beta=hp["beta"], reward_kind="logratio")
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert metrics[key].mean().item() == pytest.approx(trl_metrics[key][0], rel=1e-9, abs=1e-12), key


def test_multi_loss_matches_trl():
    _trl()
    completion_mask, per_token, ref_chosen, ref_rejected, pair = _random_batch(seed=7)
    types, weights = ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]  # MPO's combination in TRL's docs
    theirs, _ = _trl_dpo_loss(types, weights, completion_mask, per_token, ref_chosen, ref_rejected, beta=0.1)
    ours = preference_loss(types, pair, loss_weights=weights, beta=0.1)
    assert ours.mean().item() == pytest.approx(theirs.item(), rel=1e-9)


def _trainer_stub(**fields):
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x)
    return SimpleNamespace(accelerator=accelerator, **fields)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_simpo_and_cpo_preference_terms_match_trl_cpo_loss(label_smoothing):
    _trl()
    from trl.experimental.cpo import CPOTrainer

    *_, pair = _random_batch(seed=3)
    # SimPO: TRL's CPOTrainer feeds per-token averaged log-probs to cpo_loss with loss_type="simpo"
    stub = _trainer_stub(alpha=0.0, loss_type="simpo", simpo_gamma=0.7, beta=2.0, label_smoothing=label_smoothing)
    avg_c, avg_r = pair.chosen_logps / pair.chosen_lengths, pair.rejected_logps / pair.rejected_lengths
    theirs, trl_chosen_rewards, _ = CPOTrainer.cpo_loss(stub, avg_c, avg_r)
    ours = preference_loss(["simpo"], pair, beta=2.0, simpo_gamma=0.7, label_smoothing=label_smoothing)
    torch.testing.assert_close(ours, theirs)
    metrics = preference_metrics(pair, beta=2.0, reward_kind="mean_logp")
    torch.testing.assert_close(metrics["rewards/chosen"], trl_chosen_rewards)
    # CPO: summed log-probs, loss_type="sigmoid"; TRL adds cpo_alpha * NLL outside cpo_loss
    stub = _trainer_stub(alpha=0.0, loss_type="sigmoid", simpo_gamma=0.5, beta=0.1, label_smoothing=label_smoothing)
    theirs, trl_chosen_rewards, _ = CPOTrainer.cpo_loss(stub, pair.chosen_logps, pair.rejected_logps)
    nll = -pair.chosen_logps.sum() / pair.chosen_lengths.sum()
    ours = preference_loss(["cpo"], pair, beta=0.1, cpo_alpha=0.5, label_smoothing=label_smoothing)
    torch.testing.assert_close(ours, theirs + 0.5 * nll)
    metrics = preference_metrics(pair, beta=0.1, reward_kind="logp")
    torch.testing.assert_close(metrics["rewards/chosen"], trl_chosen_rewards)


def test_orpo_odds_ratio_term_matches_trl():
    _trl()
    from trl.experimental.orpo import ORPOTrainer

    *_, pair = _random_batch(seed=5)
    avg_c, avg_r = pair.chosen_logps / pair.chosen_lengths, pair.rejected_logps / pair.rejected_lengths
    trl_terms, trl_chosen_rewards, _, _, _ = ORPOTrainer.odds_ratio_loss(_trainer_stub(beta=0.25), avg_c, avg_r)
    nll = -pair.chosen_logps.sum() / pair.chosen_lengths.sum()
    # TRL: loss = nll - mean(beta * log sigmoid(log_odds)); its NLL also covers prompt tokens (see orpo_loss)
    # (TRL computes the odds ratio in float32, as orpo_loss does; the NLL stays in the inputs' float64)
    ours = preference_loss(["orpo"], pair, beta=0.25)
    torch.testing.assert_close(ours, nll - trl_terms, check_dtype=False, rtol=1.3e-6, atol=1e-5)
    metrics = preference_metrics(pair, beta=0.25, reward_kind="mean_logp")
    torch.testing.assert_close(metrics["rewards/chosen"], trl_chosen_rewards, check_dtype=False)


# --- what configs pass to the losses: read from the declarations --------------------------------------------


def _configs_selecting_preference_losses() -> set[type]:
    """Every command's config with a ``loss_type`` whose default names losses of this registry."""
    import dataclasses

    from alignlab.methods import methods

    found = set()
    for method in methods().values():
        field = {f.name: f for f in dataclasses.fields(method.config)}.get("loss_type")
        if field is None:
            continue
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        if all(name in PREFERENCE_LOSSES for name in ([default] if isinstance(default, str) else default)):
            found.add(method.config)
    return found


def test_every_declared_hyperparameter_is_a_field_of_every_config_that_can_select_the_loss():
    import dataclasses

    from alignlab.algorithms.dpo import DPOConfig
    from alignlab.algorithms.iterative_dpo import IterativeDPOConfig
    from alignlab.algorithms.online_dpo import OnlineDPOConfig

    configs = _configs_selecting_preference_losses()
    assert {DPOConfig, OnlineDPOConfig, IterativeDPOConfig} <= configs
    for config in configs:
        fields = {f.name for f in dataclasses.fields(config)}
        for name in PREFERENCE_LOSSES:
            missing = set(PREFERENCE_LOSSES.fields(name)) - fields
            assert not missing, f"{config.__name__} can select {name!r} but has no field {sorted(missing)}"


def test_configs_pass_what_the_selected_losses_declare(tmp_path):
    from alignlab.algorithms.dpo import DPOConfig

    def config(**kw):
        return DPOConfig(dataset_name="builtin:concise", output_dir=str(tmp_path), **kw)

    assert config(beta=0.3).loss_hyperparameters() == {"beta": 0.3, "label_smoothing": 0.0}
    assert config(loss_type=["simpo", "sft"], simpo_gamma=0.7).loss_hyperparameters() == {
        "beta": 0.1, "simpo_gamma": 0.7, "label_smoothing": 0.0, "alpha": 0.0}
    assert config(loss_type=["discopop"], discopop_tau=0.2).loss_hyperparameters() == {"beta": 0.1, "discopop_tau": 0.2}

    # a loss with a hyperparameter no config offers fails loudly instead of running at its default
    @register_preference_loss("test_margin", hyperparameters=("beta", "test_margin"))
    def margin_loss(pair, *, beta, test_margin=0.5):
        return -torch.nn.functional.logsigmoid(beta * (pair.chosen_logratios - pair.rejected_logratios) - test_margin)

    try:
        with pytest.raises(ValueError, match="DPOConfig has no field 'test_margin'"):
            config(loss_type=["test_margin"]).loss_hyperparameters()
    finally:
        PREFERENCE_LOSSES.pop("test_margin")


def test_f_divergence_scores_hand_worked():
    from alignlab.losses.dpo import f_divergence_score

    u2 = torch.tensor([math.log(2.0), 0.0])  # ratios 2 and 1
    assert f_divergence_score(u2, "reverse_kl").tolist() == u2.tolist()
    assert f_divergence_score(u2, "forward_kl").tolist() == pytest.approx([0.5, 0.0])  # 1 - 1/u
    assert f_divergence_score(u2, "js_divergence").tolist() == pytest.approx([math.log(4 / 3), 0.0], abs=1e-7)
    # (u^(alpha-1) - 1) / (alpha - 1) at alpha 0.5: (0.7071067812 - 1) / -0.5 = 0.5857864376
    assert f_divergence_score(u2, "alpha_divergence", 0.5).tolist() == pytest.approx([0.5857864376, 0.0])
    assert f_divergence_score(u2, "alpha_divergence", 1.0).tolist() == u2.tolist()
    with pytest.raises(ValueError):
        f_divergence_score(u2, "tv")


def test_f_divergence_pair_turns_sigmoid_into_f_dpo():
    import dataclasses

    pair = dataclasses.replace(logratio_pair([math.log(2.0)], [0.0]), f_divergence_type="forward_kl")
    # scores 0.5 and 0: -log sigmoid(1 * 0.5) = 0.4740769842
    assert loss("sigmoid", pair, beta=1.0) == pytest.approx([0.4740769842])
    assert pair.chosen_logps.tolist() == pytest.approx([math.log(2.0)])


def test_length_desensitized_logps_hand_worked():
    from alignlab.losses.dpo import length_desensitized_logps

    logps = torch.tensor([[0.0, -1.0, -2.0, -3.0], [0.0, -4.0, -5.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0]])
    # shared length 2: chosen -1 - 2 + 0.5 * -3 = -4.5; rejected has no verbose tokens: -9
    out = length_desensitized_logps(logps, mask, 0.5)
    assert out.tolist() == [-4.5, -9.0]
    out.sum().backward()
    assert logps.grad.tolist() == [[0.0, 1.0, 1.0, 0.5], [0.0, 1.0, 1.0, 0.0]]
    assert length_desensitized_logps(logps, mask, 1.0).tolist() == [-6.0, -9.0]
    with pytest.raises(ValueError):
        length_desensitized_logps(logps[:1], mask[:1], 0.5)
