"""LocalSequential: training, inference, progressive prediction."""
import torch

import localprop as lp
from localprop import data
from localprop.training import fit
from tests.conftest import SGD, mlp_nodes


def test_train_step_returns_every_nodes_loss(batch):
    x, y = batch
    net = lp.LocalSequential(*mlp_nodes([9, 16, 16, 5]), rule="greedy", num_classes=5, optimizer=SGD)
    stats = net.train_step(x, y)
    assert stats.step == 0 and list(stats.losses) == ["0", "1", "2"]
    assert net.train_step(x, y).step == 1


def test_bp_reports_the_final_loss(batch):
    x, y = batch
    net = lp.LocalSequential(*mlp_nodes([9, 16, 5]), rule="bp", num_classes=5, optimizer=SGD)
    assert list(net.train_step(x, y).losses) == ["1"]
    assert all(n.head is None for n in net.nodes)


def test_inference_matches_autograd_forward(batch):
    x, _ = batch
    net = lp.LocalSequential(*mlp_nodes([9, 16, 5], torch.float64), num_classes=5)
    x = x.double()
    with torch.no_grad():
        fused = net(x)
    plain = x
    for node in net.nodes:
        plain = lp.ops.activation.apply(torch.nn.functional.linear(plain, node.weight, node.bias), node.activation)
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)


def test_predict_progressive_exits():
    torch.manual_seed(0)
    split = data.digits()
    net = lp.LocalSequential(*mlp_nodes([64, 64, 64, 10]), rule="greedy", num_classes=10, optimizer=SGD)
    fit(net, split, epochs=3, progress=False)
    full = net.predict(split.x_test)
    assert (full.exit_node == 2).all()
    assert torch.equal(full.labels, net(split.x_test).argmax(1))
    early = net.predict(split.x_test, exit_threshold=0.9)
    assert (early.exit_node < 2).any()
    # a sample that exits at node k is labelled by head k
    k0 = early.exit_node == 0
    h0 = net.nodes[0](split.x_test[k0])
    assert torch.equal(early.labels[k0], net.nodes[0].head(h0).argmax(1))
    assert (early.labels == split.y_test).float().mean() > 0.85


def test_digits_accuracy_greedy_and_bp():
    """The demo's MLP reaches the accuracy the README quotes, fast (3-node version)."""
    for rule, goal in (("greedy", 0.93), ("bp", 0.93)):
        torch.manual_seed(0)
        net = lp.LocalSequential(*mlp_nodes([64, 128, 128, 10]), rule=rule, num_classes=10,
                                 optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
        history = fit(net, data.digits(), epochs=5, progress=False)
        assert history.final_accuracy > goal, (rule, history.test_accuracy)
