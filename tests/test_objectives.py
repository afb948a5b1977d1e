"""Objectives (loss=) and the lean cross-entropies behind per-token targets and token heads,
against PyTorch's own in float64, on fresh random inputs with odd shapes."""
import pytest
import torch
import torch.nn.functional as F

from localprop import heads, objectives
from tests.ops.cases import assert_matches


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(objectives, "CHUNK", 7)  # several chunks, the last one partial


def labels(shape, classes, ignored, g):
    t = torch.randint(0, classes, shape, generator=g)
    if ignored:
        t[torch.rand(shape, generator=g) < 0.3] = objectives.IGNORE_INDEX
    return t


def error(a, ref):
    return max(float((x.detach().double() - y.detach()).abs().max()) for x, y in zip(a, ref))


@pytest.mark.parametrize("ignored", [False, True])
@pytest.mark.parametrize("shape", [(3, 11, 13), (2, 5, 3, 17)])
def test_lean_cross_entropy_is_pytorchs(shape, ignored):
    g = torch.Generator().manual_seed(sum(shape))
    base = torch.randn(*shape[:-1], shape[-1] + 3, generator=g, dtype=torch.float64)[..., 2:-1]  # non-contiguous
    t = labels(shape[:-1], shape[-1], ignored, g)

    def run(logits, fn):
        logits = logits.detach().requires_grad_()
        value = fn(logits)
        return [value, *torch.autograd.grad(value, logits)]

    ref = run(base, lambda z: F.cross_entropy(z.reshape(-1, z.shape[-1]), t.reshape(-1)))
    ours = run(base, lambda z: objectives.CrossEntropy()(z, t))
    assert error(ours, ref) <= 1e-12
    # float32: within twice PyTorch's own float32 error (and the final rounding), the ops' rule
    torch32 = run(base.float(), lambda z: F.cross_entropy(z.reshape(-1, z.shape[-1]), t.reshape(-1)))
    ours32 = run(base.float(), lambda z: objectives.CrossEntropy()(z, t))
    for what, out, ref64, ref_same in zip(("loss", "gradient"), ours32, ref, torch32):
        assert_matches(out.detach(), ref64.detach(), ref_same.detach(), what=what)


@pytest.mark.parametrize("features,vocab", [(8, 200), (80, 500)])  # a plain and a low-rank head
@pytest.mark.parametrize("ignored", [False, True])
def test_token_head_loss_is_the_cross_entropy_of_its_logits(features, vocab, ignored):
    g = torch.Generator().manual_seed(features + ignored)
    torch.manual_seed(features)
    head = heads.TokenHead(features, vocab).double()
    assert len(head) == (3 if features == 80 else 2)
    h = torch.randn(3, 9, features + 1, generator=g, dtype=torch.float64)[..., 1:]
    t = labels((3, 9), vocab, ignored, g)
    wrt = [h.requires_grad_(), *head.parameters()]
    ref = F.cross_entropy(head(h).reshape(-1, vocab), t.reshape(-1))
    ours = head.loss(h, t, objectives.CrossEntropy())
    assert error([ours, *torch.autograd.grad(ours, wrt)], [ref, *torch.autograd.grad(ref, wrt)]) <= 1e-12


def test_lean_cross_entropies_refuse_a_second_derivative_and_plain_ones_take_it():
    logits = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 5, (2, 4))
    (g,) = torch.autograd.grad(objectives.CrossEntropy()(logits, t), logits, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        torch.autograd.grad(g.square().sum(), logits)
    with objectives.twice_differentiable():
        (g,) = torch.autograd.grad(objectives.CrossEntropy()(logits, t), logits, create_graph=True)
    torch.autograd.grad(g.square().sum(), logits)


def test_per_sample_losses_average_the_counted_positions():
    g = torch.Generator().manual_seed(3)
    out = torch.randn(2, 6, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([[0, 1, 2, 3, -100, -100], [1, 1, 1, 1, 1, 1]])
    per = objectives.CrossEntropy().per_sample(out, t)
    assert torch.allclose(per[0], F.cross_entropy(out[0, :4], t[0, :4]))
    assert torch.allclose(per[1], F.cross_entropy(out[1], t[1]))
    assert torch.allclose(objectives.MSE().per_sample(out, out + 1), torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("loss,error_type,match", [
    ("huber", ValueError, "loss must be one of 'cross_entropy', 'mse' or a callable"),
    (3, ValueError, "loss must be one of"),
])
def test_unknown_losses(loss, error_type, match):
    with pytest.raises(error_type, match=match):
        objectives.resolve(loss)


def test_a_callable_must_return_a_scalar_or_per_sample_losses():
    bad = objectives.resolve(lambda out, t: out - t)
    with pytest.raises(TypeError, match=r"must return a scalar or per-sample losses \[B\], got \[4, 3, 2\]"):
        bad(torch.zeros(4, 3, 2), torch.zeros(4, 3, 2))
    scalar = objectives.resolve(lambda out, t: (out - t).abs().mean())
    with pytest.raises(ValueError, match=r"this rule needs per-sample losses, shape \[4\]"):
        scalar.per_sample(torch.zeros(4, 3), torch.zeros(4, 3))
