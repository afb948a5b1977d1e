"""BLL: the feedback network learns the class prototypes of the forward features, its
weights are its own, and the rule trains fused and localized nodes."""

import pytest
import torch
import torch.nn.functional as F

import localprop as lp
from localprop.rules.bll import pool
from localprop.training import fit
from tests.rules.conftest import DIGITS, digits_mlp, localized_digits_cnn


@pytest.mark.parametrize("feedback", ["chain", "direct"])
def test_feedback_aligns_with_the_class_means_of_the_features(feedback):
    """After 4 epochs, β_k(c) = b_k(...b_{K-1}(onehot(c))) (chain) or b_k(onehot(c))
    (direct) points along the mean α_k of class c on the training set: cosine > 0.9 for
    every node and class (measured >= 0.97), while at initialisation it is near 0."""
    net = digits_mlp(lp.rules.BLL(feedback=feedback), width=128)
    cosines = lambda: class_cosines(net)  # noqa: E731
    assert cosines().abs().mean() < 0.5
    fit(net, DIGITS, epochs=4, progress=False)
    assert cosines().min() > 0.9


@torch.no_grad()
def class_cosines(net) -> torch.Tensor:
    """[K-1, classes]: cos(β_k(c), mean over class c of α_k)."""
    classes = torch.arange(10)
    inputs, _ = net.rule.prototypes(net)
    h, rows = DIGITS.x_train, []
    for k, node in enumerate(net.nodes[:-1]):
        h = node(h)
        alpha = F.normalize(pool(h, net.rule.features), dim=1)
        means = torch.stack([alpha[DIGITS.y_train == c].mean(0) for c in classes])
        rows.append(F.cosine_similarity(net.rule_state.feedback[k](inputs[k]), means, dim=1))
    return torch.stack(rows)


def test_feedback_weights_are_separate_and_not_in_node_optimizers():
    net = digits_mlp("bll", width=32)
    feedback = {id(p) for p in net.rule_state.feedback.parameters()}
    in_nodes = {id(p) for node in net.nodes for g in node.optimizer.param_groups for p in g["params"]}
    assert feedback and not feedback & in_nodes
    assert [tuple(b.weight.shape) for b in net.rule_state.feedback] == [(32, 32), (32, 32), (32, 10)]
    assert all(b.bias is None for b in net.rule_state.feedback)
    assert "rule_state.feedback.0.weight" in net.state_dict()


def test_direct_feedback_maps_the_labels_to_every_node():
    """feedback="direct": each b_k reads the one-hot labels, so no prototype depends on a
    later node's feedback net, and the rule declares no top-down message."""
    net = digits_mlp(lp.rules.BLL(feedback="direct"), width=32)
    assert [tuple(b.weight.shape) for b in net.rule_state.feedback] == [(32, 10), (32, 10), (32, 10)]
    assert net.rule.messages.top_down is None and lp.rules.BLL().messages.top_down == "step"
    inputs, _ = net.rule.prototypes(net)
    assert all(torch.equal(p, torch.eye(10)) for p in inputs.values())
    before = net.rule_state.feedback[0].weight.clone()
    with torch.no_grad():
        net.rule_state.feedback[2].weight.mul_(3)  # a later b: node 0's step must not see it
    net.train_step(DIGITS.x_train[:64], DIGITS.y_train[:64])
    reference = digits_mlp(lp.rules.BLL(feedback="direct"), width=32)
    reference.train_step(DIGITS.x_train[:64], DIGITS.y_train[:64])
    assert not torch.equal(net.rule_state.feedback[0].weight, before)
    torch.testing.assert_close(net.rule_state.feedback[0].weight, reference.rule_state.feedback[0].weight,
                               rtol=0, atol=0)


def test_bll_trains_a_localized_cnn():
    """Feature maps are max-pooled over positions and centred before the alignment, flat
    features taken as they are."""
    split = lp.data.digits(image=True)
    net = localized_digits_cnn("bll", split)
    assert [b.weight.shape[0] for b in net.rule_state.feedback] == [8, 16 * 64]  # a map's channels, flat features
    assert fit(net, split, epochs=4, progress=False).final_accuracy > 0.9


def test_centred_features_are_the_released_codes():
    """features="centred": the global max over positions, minus each sample's mean over channels."""
    h = torch.randn(3, 5, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    peak = h.amax((2, 3))
    torch.testing.assert_close(pool(h, "centred"), peak - peak.mean(1, keepdim=True), rtol=0, atol=0)
    assert lp.rules.bll.feature_dim((5, 4, 4), "centred") == 5 and lp.rules.bll.feature_dim((5, 4, 4), "pooled") == 20
    torch.testing.assert_close(pool(h), pool(h, "centred"), rtol=0, atol=0)  # "auto" on a map
    torch.testing.assert_close(pool(h[:, :, 0, 0]), h[:, :, 0, 0], rtol=0, atol=0)  # and on [C] features
    torch.testing.assert_close(pool(h[:, :, 0, 0], "centred").sum(1), torch.zeros(3, dtype=torch.float64))
