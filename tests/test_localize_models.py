"""localize() on the models users bring (nn.Module ResNets, transformers, language models)
and any task (per-token labels, regression, a loss of one's own)."""
import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import localprop as lp
from localprop import trace, zoo

SGD = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)


def small_resnet(dtype=torch.float32):
    torch.manual_seed(0)
    return zoo.resnet18(width=4, classes=5).to(dtype)


def small_gpt(layers=4):
    torch.manual_seed(0)
    return zoo.gpt(vocab=40, dim=16, layers=layers, heads=2, context=32)


def images(n=6, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 12, 12, generator=g, dtype=dtype), torch.randint(0, 5, (n,), generator=g)


def tokens(n=3, t=12, vocab=40):
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, vocab, (n, t + 1), generator=g)


def params(module):
    return [p.detach().clone() for p in module.parameters()]


# ---- any model ---------------------------------------------------------------------------
def test_resnet_module_by_node_count_keeps_the_functional_ops():
    model = small_resnet()
    net = lp.localize(model, nodes=4, optimizer=SGD)
    # the 8 BasicBlocks are the blocks; the stem joins node 0, pooling and fc the last
    assert [n.label for n in net.nodes] == ["from the model's input", "from 'layer2.0'", "from 'layer3.0'",
                                            "from 'layer4.0'"]
    x, y = images()
    with torch.no_grad():
        expected = model.eval()(x)
        assert torch.equal(net.eval()(x), expected)  # the same forward, F.relu, flatten and adds included
    net.train()
    before = params(model)
    r = net.train_step(x, y)
    assert len(r.losses) == 4 and all(torch.isfinite(torch.tensor(v)) for v in r.losses.values())
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # trained in place


def test_resnet_by_split_points_and_every_parameter_in_one_node():
    model = small_resnet()
    net = lp.localize(model, split_points=["layer3", "layer2"])  # any order: sorted as forward calls them
    assert [n.label for n in net.nodes] == ["from the model's input", "from 'layer2'", "from 'layer3'"]
    owned = [{id(p) for p in n.block.parameters()} for n in net.nodes]
    assert sum(len(o) for o in owned) == len(set().union(*owned)) == len(list(model.parameters()))


@pytest.mark.parametrize("make,batch", [
    (small_resnet, lambda: images()[0]),
    (small_gpt, lambda: tokens()[:, :-1]),
])
def test_gradients_stay_inside_each_node(make, batch):
    """A node's output, from a detached input, reaches its own parameters only."""
    model = make()
    net = lp.localize(model, nodes=4).build(batch())
    h = batch()
    for node in net.nodes:
        u = h.detach()
        out = node(u)
        grads = torch.autograd.grad(out.float().sum(), list(model.parameters()), allow_unused=True)
        own = {id(p) for p in node.block.parameters()}
        for p, g in zip(model.parameters(), grads):
            assert (g is not None and bool(g.abs().sum() > 0)) == (id(p) in own)
        h = out


@pytest.mark.parametrize("make,batch,target", [
    (lambda: small_resnet(torch.float64), lambda: images(dtype=torch.float64)[0], lambda: images()[1]),
    (lambda: small_gpt().double(), lambda: tokens()[:, :-1], lambda: tokens()[:, 1:]),
])
def test_rule_bp_on_a_localized_model_is_plain_training_of_it(make, batch, target):
    model, reference = make(), make()
    net = lp.localize(model, nodes=3, rule="bp", optimizer=SGD)
    opt = SGD(reference.parameters())
    for _ in range(3):
        net.train_step(batch(), target())
        out = reference(batch())
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), target().reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-10), name


# ---- language models, tokens, keyword inputs -------------------------------------------
def test_causal_lm_learns_per_token_targets_at_any_length():
    model = small_gpt()
    net = lp.localize(model, nodes=4, optimizer=functools.partial(torch.optim.Adam, lr=3e-3))
    seq = torch.arange(24).remainder(8).repeat(4, 1) + torch.arange(4)[:, None]  # learnable: the next token
    first = net.train_step(seq[:, :16], seq[:, 1:17]).losses
    for step in range(60):
        t = 9 + step % 8  # the sequence length changes between steps
        last = net.train_step(seq[:, :t], seq[:, 1:t + 1]).losses
    assert last["3"] < 0.5 * first["3"]
    assert net(seq[:, :5]).shape == (4, 5, 40)
    assert net.predict(seq[:, :7]).labels.shape == (4, 7)
    assert [type(n.head).__name__ for n in net.nodes[:-1]] == ["TokenHead"] * 3


def test_token_heads_are_low_rank_for_a_large_vocabulary():
    head = lp.heads.TokenHead(256, 5000)
    assert sum(p.numel() for p in head.parameters()) < 256 * 5000 // 3
    small = lp.heads.TokenHead(16, 5000)  # where a factorisation would cost more, a plain Linear
    assert sum(p.numel() for p in small.parameters()) == 16 * 2 + 16 * 5000 + 5000


def test_ignored_positions_do_not_count():
    net = lp.localize(small_gpt(), nodes=2, rule="bp")
    seq = tokens()
    target = seq[:, 1:].clone()
    target[:, 6:] = -100
    with torch.no_grad():
        out = net(seq[:, :-1])
    full = lp.objectives.CrossEntropy()(out, target)
    assert torch.allclose(full, F.cross_entropy(out[:, :6].reshape(-1, 40), seq[:, 1:7].reshape(-1)))
    net.train_step(seq[:, :-1], target)


def test_keyword_inputs_reach_every_node():
    torch.manual_seed(0)
    model = zoo.Encoder(vocab=30, dim=16, layers=4, heads=2, classes=3)
    net = lp.localize(model, nodes=4)
    assert net.input_names == ("attention_mask",)
    ids = torch.randint(0, 30, (4, 10))
    mask = torch.ones(4, 10, dtype=torch.bool)
    mask[:, 7:] = False
    y = torch.tensor([0, 1, 2, 1])
    net.train_step(ids, y, attention_mask=mask)
    other = ids.clone()
    other[:, 7:] = (other[:, 7:] + 1) % 30  # padding only: the mask hides it from every node
    with torch.no_grad():
        assert torch.allclose(net.eval()(ids, attention_mask=mask), net(other, attention_mask=mask))
        assert not torch.allclose(net(ids, attention_mask=mask), net(other, attention_mask=~mask | True))
    with pytest.raises(TypeError, match="missing keyword input 'attention_mask'"):
        net.train_step(ids, y)
    with pytest.raises(TypeError, match="unexpected keyword input 'mask': this network takes attention_mask"):
        net.train_step(ids, y, mask=mask)


# ---- the rules on real models ----------------------------------------------------------
@pytest.mark.parametrize("rule", ["greedy", "sgr", "critic", "bll", "pgl"])
def test_rules_train_a_localized_resnet(rule):
    model = small_resnet()
    net = lp.localize(model, nodes=3, rule=rule, optimizer=SGD)
    x, y = images()
    before = params(model)
    for _ in range(2):
        r = net.train_step(x, y)
    assert all(v == v for v in r.losses.values())
    assert sum(not torch.equal(a, b) for a, b in zip(before, model.parameters())) == len(before)


@pytest.mark.parametrize("rule", ["greedy", "sgr", "critic", "pgl"])
def test_rules_train_a_localized_language_model(rule):
    model = small_gpt(layers=2)
    net = lp.localize(model, nodes=2, rule=rule)
    seq = tokens()
    before = params(model)
    net.train_step(seq[:, :-1], seq[:, 1:])
    assert sum(not torch.equal(a, b) for a, b in zip(before, model.parameters())) == len(before)


@pytest.mark.parametrize("rule", ["greedy", "critic", "bll"])
def test_rules_train_a_vision_transformer_on_token_features(rule):
    torch.manual_seed(0)
    net = lp.localize(zoo.ViT(image=8, patch=4, dim=16, layers=2, heads=2, classes=3), nodes=2, rule=rule,
                      heads="tokens")
    r = net.train_step(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]))
    assert len(r.losses) == 2


def test_rules_that_cannot_train_a_model_say_why():
    with pytest.raises(ValueError, match="rule 'bll' aligns each sample's features .* outputs \\[B, \\*, 40\\]"):
        lp.localize(small_gpt(), nodes=2, rule="bll").build(tokens())
    with pytest.raises(ValueError, match="locprop needs LocalLinear nodes"):
        lp.localize(small_resnet(), nodes=2, rule="locprop").build(images()[0])


def test_predict_and_submodel_on_a_localized_resnet():
    model = small_resnet()
    net = lp.localize(model, nodes=3)
    x, y = images()
    net.train_step(x, y)
    p = net.predict(x, exit_threshold=0.0)
    assert p.exit_node.tolist() == [0] * 6 and p.flops_fraction < 1
    sub = net.submodel(1).eval()
    with torch.no_grad():
        net.eval()
        h = net.nodes[1](net.nodes[0](x))
        assert torch.equal(sub(x), net.nodes[1].head(h))


# ---- any task ---------------------------------------------------------------------------
class Regressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 16)
        self.hidden = nn.Linear(16, 16)
        self.out = nn.Linear(16, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(F.relu(self.inp(x)))))


def test_regression_with_mse_learns():
    torch.manual_seed(0)
    net = lp.localize(Regressor(), loss="mse", optimizer=functools.partial(torch.optim.Adam, lr=1e-2))
    x = torch.randn(64, 4)
    y = torch.stack([x[:, 0] * x[:, 1], x[:, 2].sin()], 1)
    first = net.train_step(x, y).losses["2"]
    for _ in range(150):
        last = net.train_step(x, y).losses["2"]
    assert last < 0.3 * first
    with pytest.raises(ValueError, match=r"the target y must have the output's shape \[64, 2\], got \[64\]"):
        net.train_step(x, y[:, 0])
    with pytest.raises(ValueError, match="predict: loss 'mse' has no classes"):
        net.predict(x)


def test_a_loss_of_ones_own():
    calls = []

    def smooth_l1(out, target):
        calls.append(out.shape)
        return F.smooth_l1_loss(out, target, reduction="none").mean(1)

    net = lp.localize(Regressor(), loss=smooth_l1, rule="critic")
    net.train_step(torch.randn(8, 4), torch.randn(8, 2))
    assert calls and all(s == (8, 2) for s in calls)  # heads and the last node predict the output's shape


@pytest.mark.parametrize("loss,target", [("mse", lambda: torch.randn(8, 3)),
                                         ("cross_entropy", lambda: torch.tensor([0, 1, 2, -100, 1, 0, 2, 2]))])
def test_fused_nodes_learn_other_objectives_as_autograd_nodes_do(loss, target):
    """LocalLinear with an objective its fused op lacks (mse, ignored labels) learns from
    the objective's gradient as an autograd node of the same weights does (float64)."""
    torch.manual_seed(0)
    fused = lp.mlp([5, 7, 3], rule="greedy", loss=loss, dtype=torch.float64, backend="cpp", optimizer=SGD)
    autograd = lp.LocalSequential(
        *[lp.ModuleNode(nn.Sequential(nn.Linear(5, 7), nn.ReLU())), lp.ModuleNode(nn.Linear(7, 3))],
        rule="greedy", loss=loss, optimizer=SGD).double()
    autograd.build(torch.randn(2, 5, dtype=torch.float64))
    with torch.no_grad():
        pairs = [(fused.nodes[0], autograd.nodes[0].block[0]), (fused.nodes[1], autograd.nodes[1].block)]
        for f, a in pairs:
            a.weight.copy_(f.weight)
            a.bias.copy_(f.bias)
        autograd.nodes[0].head.load_state_dict(fused.nodes[0].head.state_dict())
    x, y = torch.randn(8, 5, dtype=torch.float64), target()
    y = y.double() if loss == "mse" else y
    for _ in range(3):
        fused.train_step(x, y)
        autograd.train_step(x, y)
    for f, a in pairs:
        assert torch.allclose(f.weight, a.weight, rtol=0, atol=1e-12)


# ---- errors that name what and where ---------------------------------------------------
def test_unknown_split_point_suggests_names():
    with pytest.raises(ValueError, match=r"ResNet has no submodule 'layr3' \(split point\); did you mean 'layer3'"):
        lp.localize(small_resnet(), split_points=["layr3"])


class Skip(nn.Module):
    """The stem's output is added after the last block: a skip over every split."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.blocks = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        s = self.stem(x)
        return self.out(self.blocks(s) + s)


def test_a_skip_connection_across_a_split_is_named():
    with pytest.raises(ValueError, match=r"a skip connection crosses a split: 'stem' \(call_module stem\) of node 0 "
                                         r"is used by 'add' \(call_function add\) in node 2"):
        lp.localize(Skip(), nodes=3)
    with pytest.raises(ValueError, match=r"two activations pass from node 0 to node 1: 'stem' \(call_module stem\) "
                                         r"and 'blocks_1' \(call_module blocks.1\) \(a skip connection"):
        lp.localize(Skip(), split_points=["blocks.2"])


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow in forward, outside any block
            x = -x
        return self.b(self.a(x))


def test_an_untraceable_forward_says_what_to_do():
    with pytest.raises(TypeError, match=r"torch.fx cannot trace Branchy.forward: .*block=TheBlockClass"):
        lp.localize(Branchy(), nodes=2)


class Noisy(nn.Module):
    """A block with a functional dropout inside (traced down to its layers when a node of
    it recomputes its first half)."""

    def __init__(self, width):
        super().__init__()
        self.a, self.b = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        return self.b(F.dropout(torch.relu(self.a(x)), 0.5, training=self.training))


class Dropping(nn.Module):
    """Functional dropout at the model's own level, before and after its blocks, read from
    ``self.training`` (``not self.training`` with ``inverted``: a flag that is False in training)."""

    def __init__(self, inverted=False):
        super().__init__()
        self.inverted = inverted
        self.stem, self.head = nn.Linear(4, 8), nn.Linear(8, 3)
        self.blocks = nn.Sequential(Noisy(8), Noisy(8), Noisy(8))

    def forward(self, x):
        on = not self.training if self.inverted else self.training
        x = F.dropout(torch.relu(self.stem(x)), 0.5, training=on)
        return self.head(F.dropout(self.blocks(x), 0.5, training=self.training))


# nodes=2: the code between blocks checkpointed as runs; nodes=3: node 1, of one block, recomputes its first half
@pytest.mark.parametrize("checkpoint, nodes", [(False, 2), (True, 2), (True, 3)])
def test_a_localized_model_runs_the_code_of_the_mode_it_is_in(checkpoint, nodes):
    """torch.fx evaluates ``self.training`` while tracing; the localized network reads the
    flag as it runs instead: in eval mode it computes the model's eval output, in training
    mode it draws the model's own dropout masks (the same random stream), whichever mode
    the model was in when localized."""
    torch.manual_seed(0)
    model, x = Dropping(), torch.randn(6, 4)
    model.eval()  # localized in eval mode: the training graph must still drop out
    net = lp.localize(model, nodes=nodes, checkpoint=checkpoint, example_input=x)
    assert hasattr(net.nodes[1].block, "_first_half") == (nodes == 3)
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), model(x))
    net.train()
    torch.manual_seed(1)
    out = net(x)
    torch.manual_seed(1)
    assert torch.equal(out, model(x))
    assert not torch.equal(out, net.eval()(x))
    net.train().train_step(x, torch.randint(0, 3, (6,)))


def test_a_flag_that_is_false_in_training_is_read_negated():
    torch.manual_seed(0)
    model, x = Dropping(inverted=True), torch.randn(6, 4)
    net = lp.localize(model, nodes=2, example_input=x)
    for mode in (True, False):
        net.train(mode)
        torch.manual_seed(1)
        out = net(x)
        torch.manual_seed(1)
        assert torch.equal(out, model(x))


class Jittered(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        if self.training:  # other ops in training mode: not a flag a traced graph can read
            x = x + 0.1 * torch.randn_like(x)
        return self.b(self.a(x))


def test_a_forward_that_branches_on_the_mode_says_what_to_do():
    with pytest.raises(TypeError, match=r"Jittered.forward runs other code in training than in eval mode "
                                        r"\(.*\).*hooks=True"):
        lp.localize(Jittered(), nodes=2)
    model = Jittered()
    assert model.training
    net = lp.localize(model, nodes=2, hooks=True)  # its own forward, either mode
    net.train_step(torch.randn(5, 4), torch.randint(0, 3, (5,)))


def test_a_block_that_branches_on_the_mode_runs_whole_when_recomputed():
    """checkpoint=True on a node of one block whose code differs by mode beyond flags:
    the block is not traced down to its layers (it would hold one mode's code) but
    checkpointed whole, and in eval mode it computes the model's eval output."""
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(Jittered(), nn.Linear(3, 4), Jittered())

        def forward(self, x):
            return self.blocks(x)

    torch.manual_seed(0)
    model, x = Model(), torch.randn(5, 4)
    net = lp.localize(model, nodes=3, checkpoint=True, example_input=x)
    assert not hasattr(net.nodes[0].block, "_first_half")
    net.eval()
    assert torch.equal(net(x), model.eval()(x))


def test_wrong_targets_change_nothing():
    model = small_gpt(layers=2)
    net = lp.localize(model, nodes=2)
    seq = tokens()
    net.train_step(seq[:, :-1], seq[:, 1:])
    before = params(model)
    with pytest.raises(ValueError, match=r"labels y for outputs of shape \[B, 12, 40\] must have shape \[3, 12\], "
                                         r"got \[3\]"):
        net.train_step(seq[:, :-1], seq[:, 1])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 40\), got values in \[40, 40\]"):
        net.train_step(seq[:, :-1], torch.full((3, 12), 40))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_bad_node_counts_and_arguments():
    with pytest.raises(ValueError, match=r"nodes must lie in \[1, 8\] for ResNet, which has 8 blocks"):
        lp.localize(small_resnet(), nodes=9)
    with pytest.raises(ValueError, match="give nodes= or split_points=, not both"):
        lp.localize(small_resnet(), nodes=2, split_points=["layer2"])
    with pytest.raises(ValueError, match="has no module of class GPT"):
        lp.localize(small_resnet(), block=zoo.GPT)


def test_block_class_picks_the_blocks():
    net = lp.localize(small_gpt(), block=zoo.TransformerBlock, nodes=2)
    assert [n.label for n in net.nodes] == ["from the model's input", "from 'blocks.2'"]


def test_a_copy_of_a_localized_model_trains_apart():
    net = lp.localize(small_resnet(), nodes=2)
    x, y = images()
    net.train_step(x, y)
    twin = copy.deepcopy(net)
    twin.train_step(x, y)
    assert not torch.equal(twin.nodes[0].block.conv1.weight, net.nodes[0].block.conv1.weight)


def test_graph_goals_take_a_loss_of_ones_own():
    calls = []

    def l1(out, target):
        calls.append(1)
        return (out - target).abs().mean()

    g = lp.LocalGraph(rule="bp")
    g.add("a", lp.LocalLinear(4, 8), inputs="x").add("out", lp.LocalLinear(8, 2, activation=None), inputs="a")
    g.goal("out", target="y", loss=l1)
    g.train_step({"x": torch.randn(5, 4)}, {"y": torch.randn(5, 2)})
    assert calls
    with pytest.raises(ValueError, match="x and 'y' disagree: x has a batch of 5"):
        g.train_step({"x": torch.randn(5, 4)}, {"y": torch.randn(3, 2)})
    loc = lp.LocalGraph(rule="locprop")
    loc.add("out", lp.LocalLinear(4, 2, activation=None), inputs="x").goal("out", target="y", loss=l1)
    with pytest.raises(ValueError, match="goal 'out': locprop's error vectors are derived for cross-entropy and mse"):
        loc.train_step({"x": torch.randn(5, 4)}, {"y": torch.randn(5, 2)})


@pytest.mark.parametrize("traced", [True, False])
def test_checkpointing_inside_nodes_learns_the_same_in_less_memory(traced):
    """checkpoint=True recomputes each block in its node's backward: the same gradients
    (float64), a lower step peak (the allocator's count, exact)."""
    def make(checkpoint):
        torch.manual_seed(0)
        model = zoo.resnet18(width=4, classes=5).double()
        blocks = model if traced else nn.Sequential(model.conv1, model.bn1, nn.ReLU(), *model.layer1, *model.layer2,
                                                    *model.layer3, *model.layer4, nn.AdaptiveAvgPool2d(1),
                                                    nn.Flatten(), model.fc)
        return model, lp.localize(blocks, nodes=2, checkpoint=checkpoint, optimizer=SGD, example_input=x)

    x, y = images(8, torch.float64)
    (plain, net), (recomputed, ck) = make(False), make(True)
    peaks = [lp.memory.measure_step(n, x, y, warmup=1).peak_bytes for n in (net, ck)]
    assert peaks[1] < peaks[0]
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-10), name
    assert_same_statistics(plain, recomputed)  # the recomputations left BatchNorm's running statistics alone


def assert_same_statistics(plain, recomputed):
    """The same BatchNorm running statistics (mean, variance, batches counted), float64."""
    buffers = list(plain.named_buffers())
    assert any(name.endswith("num_batches_tracked") and int(b) > 0 for name, b in buffers)
    for (name, a), b in zip(buffers, recomputed.buffers()):
        assert torch.allclose(a, b, rtol=0, atol=1e-12), name


def test_the_pipeline_refuses_models_that_pass_values_beside_the_activation():
    from localprop import distributed

    torch.manual_seed(0)
    distributed.check_standalone(lp.localize(small_resnet(), nodes=2))  # one activation: fine
    net = lp.localize(zoo.Encoder(vocab=30, dim=16, layers=2, heads=2, classes=3), nodes=2)
    with pytest.raises(ValueError, match=r"node 0: the model passes 'attention_mask' between its nodes besides the "
                                         r"activation, which the pipeline across processes does not carry"):
        distributed.check_standalone(net)


def test_containers_inside_blocks_are_the_blocks_own():
    """Stages of one block each: the blocks are the stages' children, not the Sequential
    shortcut inside a block (a split there would cut a block's residual)."""
    net = lp.localize(zoo.ResNet((1, 1, 1, 1), width=4), nodes=4)
    assert [n.label for n in net.nodes] == ["from the model's input", "from 'layer2.0'", "from 'layer3.0'",
                                            "from 'layer4.0'"]


def test_checkpointing_inside_nodes_keeps_no_activation_of_the_code_between_blocks():
    """With checkpoint=True a node's forward saves, for its backward, only the input of each
    checkpointed call: nothing of the blocks, nor of the stem before them or the classifier
    after them (one call each); parameters and state_dict keys are those of checkpoint=False."""
    x, _ = images(4)

    def saved_for_backward(node, u):
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            node(u)
        return shapes

    torch.manual_seed(0)
    plain = lp.localize(small_resnet(), nodes=2).build(x)
    torch.manual_seed(0)
    net = lp.localize(small_resnet(), nodes=2, checkpoint=True).build(x)
    assert list(net.state_dict()) == list(plain.state_dict())
    u = x
    for node in net.nodes:
        calls = [n for n in node.block.graph.nodes if n.op == "call_function" and n.target is trace.checkpointed]
        saved = saved_for_backward(node, u)
        assert len(saved) == len(calls) < len(saved_for_backward(plain.nodes[int(node.name)], u)), saved
        with torch.no_grad():
            u = node(u)
    # node 0: the stem as one call (its input x saved), then its 4 blocks; node 1: 4 blocks, the classifier
    assert [len(saved_for_backward(n, h)) for n, h in zip(net.nodes, (x, net.nodes[0](x).detach()))] == [5, 5]


def test_a_copy_of_a_checkpointed_node_runs_its_own_modules():
    """The checkpointed code between blocks calls the node's own modules, in a deep copy
    the copy's: training the copy leaves the original as it was, and learns as it would."""
    x, y = images(4)
    torch.manual_seed(0)
    net = lp.localize(small_resnet(), nodes=2, checkpoint=True, optimizer=SGD).build(x)
    twin = copy.deepcopy(net)
    stem = twin.nodes[0].block._between0.graph_module
    assert stem.conv1 is twin.nodes[0].block.conv1 and stem.conv1 is not net.nodes[0].block.conv1
    before = params(net)
    twin.train_step(x, y)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    net.train_step(x, y)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), twin.parameters()))


def test_a_node_of_one_block_recomputes_its_first_half():
    """checkpoint=True on a node of one block (where recomputing the block whole would hold
    the same activations and its output twice) recomputes the block's first half: the ops
    before its middle layer with parameters (a BasicBlock's conv1, bn1, relu). The same
    gradients (float64) and a lower peak for that node (the allocator's count, exact)."""
    x, y = images(8, torch.float64)

    def make(checkpoint):
        model = small_resnet(torch.float64)
        return model, lp.localize(model, split_points=["layer1.1", "layer2.0"], checkpoint=checkpoint,
                                  optimizer=SGD).build(x)

    (plain, net), (recomputed, ck) = make(False), make(True)
    alone = ck.nodes[1].block
    calls = [n for n in alone.graph.nodes if n.op == "call_function" and n.target is trace.checkpointed]
    assert len(calls) == 1
    assert [getattr(n.target, "__name__", n.target) for n in alone._first_half.graph_module.graph.nodes
            if n.op.startswith("call")] == ["layer1.1.conv1", "layer1.1.bn1", "relu"]
    peaks = [lp.memory.node_peaks(n, lp.memory.timeline(n, x, y))[1] for n in (net, ck)]
    assert peaks[1] < peaks[0]
    net.train_step(x, y)
    ck.train_step(x, y)
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-10), name
    assert_same_statistics(plain, recomputed)


def test_a_one_block_node_that_cannot_be_traced_runs_whole():
    """A block whose forward branches on a tensor's value cannot be traced down to its layers:
    checkpoint=True leaves a node of it alone as it is, and it trains."""
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)

        def forward(self, x):
            h = self.a(x)
            return self.b(h) if h.sum() > 0 else h

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.gated, self.head = nn.Linear(4, 6), Gated(), nn.Linear(6, 3)

        def forward(self, x):
            return self.head(self.gated(torch.relu(self.first(x))))

    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    nets = []
    for checkpoint in (False, True):
        torch.manual_seed(0)
        nets.append(lp.localize(Model(), split_points=["gated", "head"], checkpoint=checkpoint, block=Gated,
                                optimizer=SGD).build(x))
        nets[-1].train_step(x, y)
    assert not any(n.op == "call_function" and n.target is trace.checkpointed for n in nets[1].nodes[1].block.graph.nodes)
    assert all(torch.equal(a, b) for a, b in zip(*(n.parameters() for n in nets)))


def test_memory_balance_with_checkpointing_may_give_the_stem_a_node_alone():
    """A ResNet's stem works at full resolution like the first blocks: with checkpointing,
    a node of the stem and the first block holds the block's recomputation plus the kept
    stem output, so balance="memory" makes the stem a node of its own when that measures
    lower than every split with the stem joined to the first block."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)

    def peak(**cut):
        torch.manual_seed(0)
        net = lp.localize(zoo.resnet18(width=8), checkpoint=True, example_input=x, **cut)
        return [n.label for n in net.nodes], lp.memory.measure_step(net, x, y).peak_bytes

    labels, balanced = peak(nodes=4, balance="memory")
    assert labels[1] == "from 'layer1.0'"
    joined = [peak(split_points=starts)[1] for starts in
              (["layer1.1", "layer2.0", "layer2.1"], ["layer1.1", "layer2.0", "layer3.0"],
               ["layer2.0", "layer2.1", "layer3.0"])]
    assert balanced < min(joined)
