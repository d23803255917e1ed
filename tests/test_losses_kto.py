"""KTO loss, KL reference point and data helpers against hand-worked numbers and TRL 1.16."""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from alignlab.errors import DataError
from alignlab.data.unpaired import mismatched_completions, split_pairs_for_kto
from alignlab.losses.kto import kto_kl_reference, kto_loss

# sigmoid(1) = 0.7310585786, so 1 - sigmoid(1) = 0.2689414214; 1 - sigmoid(0) = 0.5
ONE_MINUS_SIGMOID_1 = 0.2689414213699951

# Four examples: log-ratios [1, -1, 3, 1] (policy minus reference), desirable, undesirable, desirable, undesirable.
POLICY = torch.tensor([-1.0, -3.0, 1.0, -2.0])
REF = torch.tensor([-2.0, -2.0, -2.0, -3.0])
DESIRABLE = torch.tensor([True, False, True, False])


def test_kl_reference_is_clamped_detached_mean():
    # mismatched-pair log-ratios [-1 - -3, -3 - -3] = [2, 0], mean 1
    policy = torch.tensor([-1.0, -3.0], requires_grad=True)
    z0 = kto_kl_reference(policy, torch.tensor([-3.0, -3.0]))
    assert z0.item() == 1.0 and z0.dim() == 0 and not z0.requires_grad
    # [-4 - -3, -4 - -3] = [-1, -1], mean -1 -> clamped to 0
    assert kto_kl_reference(torch.tensor([-4.0, -4.0]), torch.tensor([-3.0, -3.0])).item() == 0.0
    with pytest.raises(ValueError, match="M >= 1"):
        kto_kl_reference(torch.zeros(2), torch.zeros(3))


def test_kto_loss_hand_values():
    # beta = 0.5, z0 = 1
    # ex 0 desirable,   lr 1:  1 - sigmoid(0.5 * (1 - 1)) = 0.5          x desirable_weight 2 -> 1.0
    # ex 1 undesirable, lr -1: 1 - sigmoid(0.5 * (1 - -1)) = 0.2689414214 x 1                -> 0.2689414214
    # ex 2 desirable,   lr 3:  1 - sigmoid(0.5 * (3 - 1)) = 0.2689414214 x 2                -> 0.5378828427
    # ex 3 undesirable, lr 1:  1 - sigmoid(0.5 * (1 - 1)) = 0.5          x 1                -> 0.5
    losses, metrics = kto_loss(POLICY, REF, DESIRABLE, torch.tensor(1.0), beta=0.5, desirable_weight=2.0)
    assert losses.tolist() == pytest.approx([1.0, ONE_MINUS_SIGMOID_1, 2 * ONE_MINUS_SIGMOID_1, 0.5], rel=1e-6)
    # rewards beta * lr = [0.5, -0.5, 1.5, 0.5]: chosen [0.5, 1.5] (mean 1), rejected [-0.5, 0.5] (mean 0)
    assert metrics["rewards/chosen"].tolist() == [0.5, 1.5]
    assert metrics["rewards/rejected"].tolist() == [-0.5, 0.5]
    assert metrics["rewards/margins"].item() == 1.0
    assert metrics["logps/chosen"].tolist() == [-1.0, 1.0]
    assert metrics["logps/rejected"].tolist() == [-3.0, -2.0]
    assert metrics["kl"].item() == 1.0


def test_kto_gradient_signs():
    # desirable: the loss falls as its log-ratio rises; undesirable: the loss rises with it
    policy = POLICY.clone().requires_grad_(True)
    losses, _ = kto_loss(policy, REF, DESIRABLE, torch.tensor(0.0), beta=0.5)
    losses.sum().backward()
    assert (policy.grad[DESIRABLE] < 0).all() and (policy.grad[~DESIRABLE] > 0).all()
    # d/dlr of 1 - sigmoid(0.5 (lr - 0)) at lr = 1: -0.5 sigmoid(0.5) sigmoid(-0.5) = -0.5 * 0.2350037122
    assert policy.grad[0].item() == pytest.approx(-0.1175018561, rel=1e-6)


def test_kto_metrics_of_a_one_sided_batch_and_errors():
    losses, metrics = kto_loss(POLICY[:1], REF[:1], DESIRABLE[:1], torch.tensor(0.0), beta=0.1)
    assert set(metrics) == {"kl", "rewards/chosen", "logps/chosen"}  # no rejected group, so no margin
    with pytest.raises(ValueError, match="beta"):
        kto_loss(POLICY, REF, DESIRABLE, torch.tensor(0.0), beta=0.0)
    with pytest.raises(ValueError, match="scalar"):
        kto_loss(POLICY, REF, DESIRABLE, torch.zeros(2), beta=0.1)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        kto_loss(POLICY, REF[:3], DESIRABLE, torch.tensor(0.0), beta=0.1)


def test_mismatched_completions_rotate_by_one():
    # prompts [x1, x2, x3] get completions [y3, y1, y2]: each prompt with another example's answer
    assert mismatched_completions(["y1", "y2", "y3"]) == ["y3", "y1", "y2"]
    with pytest.raises(ValueError, match="at least 2"):
        mismatched_completions(["y1"])


def test_split_pairs_for_kto():
    rows = [
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green.", "source": "a"},
        {"prompt": "The sun is", "chosen": " in the sky.", "rejected": " in the sea.", "source": "b"},
    ]
    assert split_pairs_for_kto(rows) == [
        {"prompt": "The sky is", "completion": " blue.", "label": True, "source": "a"},
        {"prompt": "The sun is", "completion": " in the sky.", "label": True, "source": "b"},
        {"prompt": "The sky is", "completion": " green.", "label": False, "source": "a"},
        {"prompt": "The sun is", "completion": " in the sea.", "label": False, "source": "b"},
    ]
    assert split_pairs_for_kto([{"chosen": "A: hi", "rejected": "A: no"}]) == [
        {"completion": "A: hi", "label": True},
        {"completion": "A: no", "label": False},
    ]
    with pytest.raises(DataError, match="row 1: no 'rejected'"):
        split_pairs_for_kto([rows[0], {"prompt": "p", "chosen": "c"}])


# --- against TRL 1.16 ---------------------------------------------------------------------------------


def _trl():
    trl = pytest.importorskip("trl", reason="trl (test-only dependency: pip install -e '.[test]') is not installed")
    if trl.__version__ != "1.16.0":
        pytest.skip(f"these checks call TRL 1.16.0 internals; installed {trl.__version__}")
    return trl


def test_split_pairs_matches_trl_unpair_preference_dataset():
    _trl()
    from datasets import Dataset
    from trl.data_utils import unpair_preference_dataset

    rows = [
        {"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}", "score": float(i)} for i in range(5)
    ]
    theirs = list(unpair_preference_dataset(Dataset.from_list(rows)))
    assert split_pairs_for_kto(rows) == theirs


def test_kto_matches_trl_compute_loss():
    _trl()
    from trl import KTOTrainer

    g = torch.Generator().manual_seed(0)
    n, width, m = 8, 7, 8
    lengths = torch.randint(1, width, (n,), generator=g)
    completion_mask = ((torch.arange(width) >= 1) & (torch.arange(width) <= lengths[:, None])).long()
    per_token = -torch.rand(n, width - 1, generator=g, dtype=torch.float64) * 2 * completion_mask[:, 1:]
    policy = per_token.sum(1)
    ref = policy + torch.randn(n, generator=g, dtype=torch.float64)
    labels = torch.tensor([True, False, False, True, True, False, True, True])
    kl_policy = -torch.rand(m, generator=g, dtype=torch.float64) * 8
    kl_ref = kl_policy - torch.rand(m, generator=g, dtype=torch.float64)  # positive mean: z0 is not clamped
    beta, wd, wu = 0.2, 1.5, 0.7

    outputs = SimpleNamespace(
        log_probs=per_token, entropy=torch.zeros(n, width - 1), mean_logits=torch.zeros(n, width - 1)
    )
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x),
        _compute_kl_logps=lambda model, batch: kl_policy,
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        calculate_KL=True,
        loss_type="kto",
        beta=beta,
        desirable_weight=wd,
        undesirable_weight=wu,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(n, width, dtype=torch.long),
        "attention_mask": torch.ones(n, width, dtype=torch.long),
        "completion_mask": completion_mask,
        "label": labels,
        "ref_logps": ref,
        "ref_KL_logps": kl_ref,
    }
    theirs = KTOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, False)
    trl_metrics = trainer._metrics["train"]

    z0 = kto_kl_reference(kl_policy, kl_ref)
    losses, metrics = kto_loss(policy, ref, labels, z0, beta=beta, desirable_weight=wd, undesirable_weight=wu)
    assert losses.mean().item() == pytest.approx(theirs.item(), rel=1e-9)
    assert metrics["kl"].item() == pytest.approx(trl_metrics["kl"][0], rel=1e-9)
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "rewards/margins"):
        assert metrics[key].mean().item() == pytest.approx(trl_metrics[key][0], rel=1e-9), key
