"""localize(model, hooks=True): local learning through hooks on the model's own forward,
for models torch.fx cannot trace (HuggingFace's) and forwards the traced split refuses."""
import copy
import functools
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import localprop as lp
from localprop import zoo
from tests.test_localize_models import Branchy

SGD = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)


def small_resnet():
    torch.manual_seed(0)
    return zoo.resnet18(width=4, classes=5).double()


def small_gpt():
    torch.manual_seed(0)
    return zoo.gpt(vocab=40, dim=16, layers=4, heads=2, context=32).double()


def images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, 12, 12, generator=g, dtype=torch.float64), torch.randint(0, 5, (6,), generator=g)


def tokens(n=3, t=12, vocab=40):
    g = torch.Generator().manual_seed(2)
    seq = torch.randint(0, vocab, (n, t + 1), generator=g)
    return seq[:, :-1], seq[:, 1:]


def params(module):
    return [p.detach().clone() for p in module.parameters()]


# ---- the same learning as the traced split ------------------------------------------------
@pytest.mark.parametrize("make,batch,cut", [
    (small_resnet, images, {"nodes": 4}),
    (small_resnet, images, {"split_points": ["layer2", "layer4.1"]}),
    (small_gpt, tokens, {"nodes": 4}),
    (small_gpt, tokens, {"nodes": 2, "max_grad_norm": 0.05}),
])
def test_greedy_through_hooks_is_greedy_on_the_traced_split(make, batch, cut):
    """Where both mechanisms apply, they take the same steps: same heads, same optimizers,
    every parameter (BatchNorm's running statistics too) equal after three steps."""
    model = make()
    x, y = batch()
    traced_model, hooked_model = copy.deepcopy(model), copy.deepcopy(model)
    traced = lp.localize(traced_model, optimizer=SGD, example_input=x, **cut)
    hooked = lp.localize(hooked_model, optimizer=SGD, hooks=True, example_input=x, **cut)
    assert len(hooked.heads) == len(traced.nodes) - 1
    for head, node in zip(hooked.heads, traced.nodes):
        head.load_state_dict(node.head.state_dict())
    for _ in range(3):
        a, b = traced.train_step(x, y), hooked.train_step(x, y)
        assert a.losses == pytest.approx(b.losses, rel=1e-12)
    for (name, p), q in zip(traced_model.state_dict().items(), hooked_model.state_dict().values()):
        assert torch.allclose(p.double(), q.double(), rtol=0, atol=1e-12), name
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), hooked_model.parameters()))


@pytest.mark.parametrize("make,batch", [(small_resnet, images), (small_gpt, tokens)])
def test_rule_bp_through_hooks_is_plain_training(make, batch):
    model, reference = make(), make()
    net = lp.localize(model, "bp", nodes=3, hooks=True, optimizer=SGD)
    opt = SGD(reference.parameters())
    x, y = batch()
    for _ in range(3):
        net.train_step(x, y)
        out = reference(x)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-10), name


# ---- what the traced split refuses ----------------------------------------------------------
class Skip(nn.Module):
    """A skip connection across a split at blocks.2: the traced split refuses it."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(6, 8)
        self.blocks = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        s = self.stem(x)
        return self.out(self.blocks(s) + s)


def test_a_value_that_skips_a_split_carries_no_gradient_back():
    """Node 0 (the stem) learns from its own head alone, whatever node 1 is, though the
    model's forward adds the stem's output to node 1's output."""
    torch.manual_seed(0)
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0])
    stems = []
    for scale in (1.0, 3.0):
        torch.manual_seed(0)
        model = Skip().double()
        with torch.no_grad():
            model.out.weight.mul_(scale)  # the last node differs: the stem must not see it
        net = lp.localize(model, split_points=["blocks", "out"], hooks=True, optimizer=SGD)
        net.train_step(x, y)
        stems.append(params(model.stem))
        assert net._owned[0] == ["stem.weight", "stem.bias"]
    assert all(torch.equal(a, b) for a, b in zip(*stems))
    with pytest.raises(ValueError, match="two activations pass from node 0 to node 1"):
        lp.localize(Skip(), split_points=["blocks.2"])


def test_an_untraceable_forward_trains_through_hooks_and_the_trace_error_says_so():
    with pytest.raises(TypeError, match=r"cannot trace Branchy.forward: .*localize\(\.\.\., hooks=True\)"):
        lp.localize(Branchy(), nodes=2)
    torch.manual_seed(0)
    model = Branchy()
    net = lp.localize(model, nodes=2, hooks=True)
    x = torch.randn(16, 4)
    y = (x[:, 0] > 0).long()
    first = net.train_step(x, y).losses
    for _ in range(100):
        last = net.train_step(x, y).losses
    assert last["0"] < first["0"] and last["1"] < first["1"]


class Tied(nn.Module):
    """Embedding and output projection share one matrix, used by the first and last nodes."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 5)
        self.block = nn.Linear(5, 5)

    def forward(self, ids):
        return self.block(self.emb(ids)) @ self.emb.weight.t()


def test_a_parameter_of_several_nodes_learns_from_each_once():
    """The shared matrix is stepped once, by the last node that uses it, with the sum of
    the gradients of every node's loss (greedy's objective), computed here by hand."""
    torch.manual_seed(0)
    model = Tied().double()
    ids, y = torch.randint(0, 7, (4, 3)), torch.randint(0, 7, (4, 3))
    net = lp.localize(model, split_points=["block"], hooks=True,
                      optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    net.build(ids)
    assert net._owned == [[], ["emb.weight", "block.weight", "block.bias"]]
    w, block, head = model.emb.weight.detach().clone(), copy.deepcopy(model.block), copy.deepcopy(net.heads[0])
    w.requires_grad_()
    h = F.embedding(ids, w)
    loss0 = head.loss(h, y, net.objective)
    loss1 = F.cross_entropy((block(h.detach()) @ w.t()).reshape(-1, 7), y.reshape(-1))
    expected = w - 0.1 * torch.autograd.grad(loss0 + loss1, w)[0]
    net.train_step(ids, y)
    assert torch.allclose(model.emb.weight, expected, rtol=0, atol=1e-12)


# ---- the network's own behaviour ------------------------------------------------------------
def test_state_dict_resumes_training_exactly():
    x, y = tokens()
    make = lambda m: lp.localize(m, nodes=3, hooks=True, optimizer=SGD)  # noqa: E731
    a = make(small_gpt())
    for _ in range(2):
        a.train_step(x, y)
    b = make(small_gpt()).build(x)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert b.steps == 2
    for _ in range(2):
        assert a.train_step(x, y).losses == b.train_step(x, y).losses
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        if isinstance(p, torch.Tensor):  # the extra state (optimizers, steps) is a dict
            assert torch.equal(p, q), name


def test_describe_counts_every_parameter_once_and_the_heads_apart():
    model = small_gpt()
    net = lp.localize(model, nodes=4, hooks=True).build(tokens()[0])
    s = net.describe()
    assert s.params == sum(p.numel() for p in model.parameters())
    assert s.head_params == sum(p.numel() for p in net.heads.parameters()) > 0
    assert [n.label for n in s.nodes] == ["model start", "from 'blocks.1'", "from 'blocks.2'", "from 'blocks.3'"]
    assert all(n.flops > 0 for n in s.nodes) and all(n.head_flops > 0 for n in s.nodes[:-1])
    assert s.nodes[-1].output_shape == (None, 40)
    assert "heads add" in str(s)


def test_pgl_takes_global_steps_through_the_whole_model():
    x, y = tokens()
    net = lp.localize(small_gpt(), "pgl", nodes=4, hooks=True)
    kinds = [net.train_step(x, y).extra["global"] for _ in range(4)]
    assert kinds == [False, False, False, True]
    with pytest.raises(ValueError, match=r"PGL\('greedy', checkpoint=False\)"):
        lp.localize(small_gpt(), lp.rules.PGL(), nodes=4, hooks=True)


def test_memory_compare_takes_hooked_models():
    x, y = tokens()
    rows = lp.memory.compare_model(small_gpt(), x, y, rules=("bp", "greedy"), nodes=4, hooks=True)
    assert [r.rule for r in rows] == ["bp", "greedy"] and all(r.peak_bytes > 0 for r in rows)


# ---- errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("rule,why", [
    ("sgr", "reruns a node"), ("critic", "per-sample losses"), ("bll", "top-down"),
    ("locprop", "out of order"), ("bp+checkpoint", "checkpointing"),
])
def test_rules_hooks_cannot_run_say_why(rule, why):
    with pytest.raises(ValueError, match=f"cannot train with rule {re.escape(repr(rule))}.*{why}.*without hooks=True"):
        lp.localize(small_gpt(), rule, nodes=2, hooks=True)


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.unused = nn.Linear(4, 4), nn.Linear(4, 3), nn.Linear(4, 4)

    def forward(self, x):
        return self.b(self.a(self.a(x)))


def test_bad_split_points_are_named():
    with pytest.raises(ValueError, match=r"has no module 'layer9' to start a node at; its children: conv1, bn1"):
        lp.localize(small_resnet(), split_points=["layer9"], hooks=True)
    with pytest.raises(RuntimeError, match=r"split point 'unused' is never called by Twice's forward"):
        lp.localize(Twice(), split_points=["b", "unused"], hooks=True).build(torch.randn(2, 4))
    with pytest.raises(RuntimeError, match=r"split point 'a' is called more than once"):
        lp.localize(Twice(), split_points=["a"], hooks=True).build(torch.randn(2, 4))
    with pytest.raises(ValueError, match="checkpoint=True needs the model cut"):
        lp.localize(small_resnet(), nodes=2, hooks=True, checkpoint=True)


def test_a_non_finite_loss_stops_the_step_naming_its_node():
    x, y = images()
    model = small_resnet()
    net = lp.localize(model, nodes=2, hooks=True).build(x)
    with torch.no_grad():
        net.heads[0][-1].weight.fill_(float("nan"))
    before = params(model)
    with pytest.raises(FloatingPointError, match="node 0: non-finite loss at step 0"):
        net.train_step(x, y)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_wrong_targets_change_nothing():
    x, y = tokens()
    model = small_gpt()
    net = lp.localize(model, nodes=2, hooks=True)
    net.train_step(x, y)
    before = params(model)
    with pytest.raises(ValueError, match=r"must have shape \[3, 12\], got \[3\]"):
        net.train_step(x, y[:, 0])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_exits_and_submodels_need_standalone_nodes():
    x, _ = images()
    net = lp.localize(small_resnet(), nodes=2, hooks=True).build(x)
    assert net.predict(x).labels.shape == (6,)
    with pytest.raises(ValueError, match="exits and ensembles run nodes apart"):
        net.predict(x, exit_threshold=0.5)
    with pytest.raises(ValueError, match="choose_exits: exits and ensembles run nodes apart"):
        net.choose_exits(x, torch.zeros(len(x), dtype=torch.int64))
    with pytest.raises(TypeError, match="no standalone nodes"):
        net.topology()


# ---- HuggingFace transformers (optional dependency, models built from a config) ---------
def _gpt2(layers=4, dropout=0.1):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=layers, n_embd=32, n_head=4, vocab_size=61, n_positions=64,
                                  use_cache=False, bos_token_id=0, eos_token_id=0, resid_pdrop=dropout,
                                  embd_pdrop=dropout, attn_pdrop=dropout)
    return transformers.GPT2LMHeadModel(cfg)


def test_huggingface_gpt2_learns_per_token_targets_at_any_length():
    model = _gpt2()
    with pytest.raises(TypeError, match="hooks=True"):
        lp.localize(model, nodes=4)
    net = lp.localize(model, nodes=4, hooks=True, optimizer=functools.partial(torch.optim.Adam, lr=3e-3))
    assert net.starts == ["transformer.h.1", "transformer.h.2", "transformer.h.3"]
    seq = torch.arange(24).remainder(8).repeat(4, 1) + torch.arange(4)[:, None]  # learnable: the next token
    first = net.train_step(seq[:, :16], seq[:, 1:17]).losses
    for step in range(40):
        t = 9 + step % 8  # the sequence length changes between steps
        last = net.train_step(seq[:, :t], seq[:, 1:t + 1]).losses
    assert all(last[k] < 0.7 * first[k] for k in first), (first, last)
    # GPT-2 ties its input embedding to its output projection: the last node steps it
    assert "transformer.wte.weight" in net._owned[-1] and "transformer.wte.weight" in net._reached[0]
    assert net(seq[:, :5]).shape == (4, 5, 61)
    assert net.predict(seq[:, :7]).labels.shape == (4, 7)


def test_huggingface_gpt2_bp_through_hooks_is_plain_training():
    model, reference = _gpt2(dropout=0.0).double(), _gpt2(dropout=0.0).double()
    net = lp.localize(model, "bp", nodes=2, hooks=True, optimizer=SGD)
    opt = SGD(reference.parameters())
    x, y = tokens(vocab=61)
    for _ in range(2):
        net.train_step(x, y)
        loss = F.cross_entropy(reference(x).logits.reshape(-1, 61), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-10), name


def test_huggingface_bert_classifies_with_an_attention_mask():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=3)
    model = transformers.BertForSequenceClassification(cfg)
    net = lp.localize(model, nodes=2, hooks=True, optimizer=functools.partial(torch.optim.Adam, lr=1e-3))
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 50, (12, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[:6, 7:] = 0  # padded positions
    y = ids[:, 0] % 3
    first = net.train_step(ids, y, attention_mask=mask).losses
    for _ in range(30):
        last = net.train_step(ids, y, attention_mask=mask).losses
    assert last["0"] < first["0"] and last["1"] < first["1"]
    assert [type(h[-1]).__name__ for h in net.heads] == ["TokenHead"]  # pooled token features
    with torch.no_grad():
        model.eval()
        expected = model(ids, attention_mask=mask).logits.argmax(-1)
    assert torch.equal(net.predict(ids, attention_mask=mask).labels, expected)


def test_huggingface_checkpointing_recomputes_inside_each_nodes_backward():
    """With the model's own activation checkpointing, every layer is recomputed in its
    node's local backward: the same steps, and no node learns twice."""
    plain, checkpointed = _gpt2(dropout=0.0).double(), _gpt2(dropout=0.0).double()
    checkpointed.activation_checkpointing_enable()
    x, y = tokens(vocab=61)
    nets = [lp.localize(m, nodes=4, hooks=True, optimizer=SGD).build(x) for m in (plain, checkpointed)]
    nets[1].heads.load_state_dict(nets[0].heads.state_dict())
    for _ in range(2):
        a, b = (net.train_step(x, y) for net in nets)
        assert a.losses == b.losses
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.equal(p, q), name


def test_building_under_no_grad_still_finds_every_nodes_parameters():
    x, _ = images()
    with torch.no_grad():
        net = lp.localize(small_resnet(), nodes=2, hooks=True).build(x)
    assert all(net._owned) and sum(map(len, net._owned)) == len(list(net.model.parameters()))


def _llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   use_cache=False)
    return transformers.LlamaForCausalLM(cfg)


def _vit():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=4,
                                 num_attention_heads=4, intermediate_size=64, num_labels=5)
    return transformers.ViTForImageClassification(cfg)


def _ids():
    seq = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(4))
    return seq[:, :-1], seq[:, 1:]


def _images():
    g = torch.Generator().manual_seed(5)
    return torch.randn(6, 3, 16, 16, generator=g), torch.randint(0, 5, (6,), generator=g)


@pytest.mark.parametrize("make,batch,kw", [
    (_llama, _ids, {}),                    # rotary position embeddings passed to every layer as keywords
    (_vit, _images, {"heads": "tokens"}),  # patch tokens of float images: pooled token heads
])
def test_other_huggingface_families_learn_through_hooks(make, batch, kw):
    torch.manual_seed(0)
    model = make()
    net = lp.localize(model, nodes=2, hooks=True, optimizer=functools.partial(torch.optim.Adam, lr=3e-3), **kw)
    x, y = batch()
    first = net.train_step(x, y).losses
    for _ in range(25):
        last = net.train_step(x, y).losses
    assert net.starts[0].endswith("layers.2")
    assert all(last[k] < 0.8 * first[k] for k in first), (first, last)


def test_describe_with_a_batch_shows_each_nodes_step_peak():
    x, y = images()
    torch.manual_seed(0)
    net = lp.localize(small_resnet(), nodes=4, hooks=True).build(x)
    before = params(net)
    peaks = [n.step_peak for n in net.describe(x, y).nodes]
    torch.manual_seed(0)
    measured = lp.memory.measure_step(lp.localize(small_resnet(), nodes=4, hooks=True).build(x), x, y)
    assert all(p is not None and p > 0 for p in peaks)
    assert max(peaks) == measured.peak_bytes and peaks[0] == max(peaks)  # the full-resolution node
    assert net.steps == 0 and all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_moved_to_another_dtype_it_trains_on():
    """net.double() after training: every node's backward and optimizer reach the moved
    parameters (each changes in the next step), their optimizer state moved with them."""
    x, y = tokens()
    torch.manual_seed(0)
    net = lp.localize(small_gpt().float(), nodes=3, hooks=True, optimizer=SGD)
    net.train_step(x, y)
    net.double()
    before = params(net.model)
    r = net.train_step(x, y)
    assert all(torch.isfinite(torch.tensor(v)) for v in r.losses.values())
    assert all(p.dtype == torch.float64 and not torch.equal(p, q) for p, q in zip(net.model.parameters(), before))
    states = [v for o in net.optimizers() for st in o.state.values() for v in st.values() if torch.is_tensor(v)]
    assert states and all(v.dtype == torch.float64 for v in states if v.is_floating_point())
