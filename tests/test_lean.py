"""localprop.lean.BatchNorm and BatchNormReLU against nn.BatchNorm (+ nn.ReLU),
lean_layers, make_lean, and localize(lean=True)."""
import copy

import pytest
import torch
from torch import nn

import localprop as lp
from localprop import memory
from localprop.lean import SLICES, BatchNorm, BatchNormReLU, lean_layers, make_lean
from tests.ops.cases import assert_matches
from tests.test_checkpoint import assert_same

F32, F64 = torch.float32, torch.float64
#: (BatchNorm class, input shape [B, C, ...]): odd sizes, a batch not a multiple of SLICES
SHAPES = [(nn.BatchNorm1d, (7, 5)), (nn.BatchNorm1d, (9, 5, 3)), (nn.BatchNorm2d, (11, 5, 3, 4)),
          (nn.BatchNorm3d, (5, 5, 2, 3, 2)), (nn.BatchNorm2d, (2 * SLICES + 3, 3, 5, 5))]
#: (affine, track_running_stats, momentum)
SETTINGS = [(True, True, 0.1), (False, True, None), (True, False, 0.1)]


def pair(cls, channels, affine, track, momentum, seed):
    """A BatchNorm with random affine parameters and running statistics, in float64."""
    torch.manual_seed(seed)
    bn = cls(channels, affine=affine, track_running_stats=track, momentum=momentum).double()
    with torch.no_grad():
        if affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        if track:
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    return bn


def strided(shape, dtype, seed):
    """A fresh random tensor of ``shape`` whose memory is laid out in reverse (not contiguous)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape[::-1], dtype=dtype, generator=g).permute(*range(len(shape))[::-1])


@pytest.mark.parametrize("cls, shape", SHAPES)
@pytest.mark.parametrize("affine, track, momentum", SETTINGS)
@pytest.mark.parametrize("input_grad", [False, True], ids=["lean", "input-grad"])
def test_equals_batchnorm_then_relu_in_float64(cls, shape, affine, track, momentum, input_grad):
    """Two training steps: outputs, every gradient, running statistics and the step count.
    An input that needs no gradient takes the lean backward, one that does the pair's."""
    ref = pair(cls, shape[1], affine, track, momentum, seed=0)
    bn = copy.deepcopy(ref)
    lean = BatchNormReLU.adopt(bn)
    for step in range(2):
        x = strided(shape, F64, seed=step).requires_grad_(input_grad)
        x_ref = x.detach().clone().requires_grad_(input_grad)
        g = torch.randn(shape, dtype=F64)
        y, y_ref = lean(x), torch.relu(ref(x_ref))
        assert (type(y.grad_fn).__name__ == "_BatchNormReLUBackward") == (affine and not input_grad)
        if y.requires_grad:
            y.backward(g)
            y_ref.backward(g)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-14)
        if input_grad:
            torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-13)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(getattr(bn, name).grad, p.grad, rtol=0, atol=1e-12)
    for name, b in ref.named_buffers():
        assert torch.equal(getattr(bn, name), b) if b.dtype == torch.int64 else \
            torch.allclose(getattr(bn, name), b, rtol=0, atol=1e-14), name


@pytest.mark.parametrize("cls, shape", SHAPES)
@pytest.mark.parametrize("affine, track, momentum", SETTINGS)
def test_batchnorm_equals_pytorchs_in_float64(cls, shape, affine, track, momentum):
    """Two training steps of the lean BatchNorm: outputs, the input's and parameters'
    gradients, running statistics and the step count."""
    ref = pair(cls, shape[1], affine, track, momentum, seed=4)
    bn = copy.deepcopy(ref)
    lean = BatchNorm.adopt(bn)
    for step in range(2):
        x = strided(shape, F64, seed=10 + step).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        g = strided(shape, F64, seed=20 + step)
        y, y_ref = lean(x), ref(x_ref)
        assert type(y.grad_fn).__name__ == "_BatchNormBackward"
        y.backward(g)
        y_ref.backward(g)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-14)
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-13)
        assert x.grad.stride() == x_ref.grad.stride()  # the input's layout, as PyTorch's
    for name, p in ref.named_parameters():
        torch.testing.assert_close(getattr(bn, name).grad, p.grad, rtol=0, atol=1e-12)
    for name, b in ref.named_buffers():
        assert torch.equal(getattr(bn, name), b) if b.dtype == torch.int64 else \
            torch.allclose(getattr(bn, name), b, rtol=0, atol=1e-14), name


@pytest.mark.parametrize("cls, shape", SHAPES[2:])
def test_batchnorm_float32_error_within_twice_pytorchs(cls, shape):
    """In float32 the lean BatchNorm's gradients (input, weight, bias) are within 2x the
    error of PyTorch's own float32 BatchNorm, both against float64."""
    ref64 = pair(cls, shape[1], True, True, 0.1, seed=5)
    x64 = strided(shape, F64, seed=6)
    g64 = torch.randn(shape, dtype=F64)

    def grads(dtype, lean):
        m = copy.deepcopy(ref64).to(dtype)
        x = x64.detach().to(dtype).requires_grad_()
        (BatchNorm.adopt(m) if lean else m)(x).backward(g64.to(dtype))
        return x.grad, m.weight.grad, m.bias.grad

    want, torch32, ours = grads(F64, False), grads(F32, False), grads(F32, True)
    for what, out, ref, same in zip(("input", "weight", "bias"), ours, want, torch32):
        assert_matches(out, ref, same, what=f"gradient of the {what}")


@pytest.mark.parametrize("cls, shape", SHAPES[2:])
def test_float32_error_within_twice_pytorchs(cls, shape):
    """In float32, on the lean path, the parameters' gradients are within 2x the error of
    PyTorch's own float32 BatchNorm + ReLU, both against float64."""
    ref64 = pair(cls, shape[1], True, True, 0.1, seed=1)
    x64 = strided(shape, F64, seed=3)
    g64 = torch.randn(shape, dtype=F64)

    def grads(module, dtype, lean):
        m = copy.deepcopy(module).to(dtype)
        layer = BatchNormReLU.adopt(m) if lean else nn.Sequential(m, nn.ReLU())
        layer(x64.to(dtype)).backward(g64.to(dtype))
        return m.weight.grad, m.bias.grad

    want, torch32, ours = grads(ref64, F64, False), grads(ref64, F32, False), grads(ref64, F32, True)
    for what, out, ref, same in zip(("weight", "bias"), ours, want, torch32):
        assert_matches(out, ref, same, what=f"gradient of the {what}")


def test_eval_mode_and_no_grad_run_the_pair():
    ref = pair(nn.BatchNorm2d, 4, True, True, 0.1, seed=2)
    lean = BatchNormReLU.adopt(copy.deepcopy(ref))
    x = torch.randn(3, 4, 5, 5, dtype=F64)
    ref.eval(), lean.eval()
    assert torch.equal(lean(x), torch.relu(ref(x)))
    ref.train(), lean.train()
    with torch.no_grad():
        assert torch.equal(lean(x), torch.relu(ref(x)))
    assert torch.equal(lean.running_mean, ref.running_mean)


def test_bad_input_is_a_clear_error():
    lean = BatchNormReLU(4)
    for x in (torch.randn(2, 3, 5), torch.randn(2, 3, 5, requires_grad=True)):  # the lean path and the pair's
        with pytest.raises(ValueError, match="BatchNormReLU: expected 4 channels \\(dim 1\\), got shape \\[2, 3, 5\\]"):
            lean(x)
    with pytest.raises(ValueError, match="more than 1 value per channel when training, got input shape \\[1, 4\\]"):
        lean(torch.randn(1, 4))
    with pytest.raises(ValueError, match="expected an input \\[B, C, ...\\]"):
        lean(torch.randn(4))


def test_lean_layers_pairs_batchnorm_then_relu_and_keeps_keys():
    inner = nn.Sequential(nn.Conv1d(2, 3, 1), nn.BatchNorm1d(3), nn.ReLU())
    given = [nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.BatchNorm2d(2), nn.Tanh(), inner]
    before = nn.Sequential(*given).state_dict()
    out = lean_layers(given)
    assert [type(m) for m in out[:5]] == [nn.Conv2d, BatchNormReLU, nn.Identity, BatchNorm, nn.Tanh]
    assert [type(m) for m in out[5]] == [nn.Conv1d, BatchNormReLU, nn.Identity]
    assert list(nn.Sequential(*out).state_dict()) == list(before)
    assert out[1].weight is given[1].weight and out[1].running_mean is given[1].running_mean  # shared, not copied
    assert type(given[1]) is nn.BatchNorm2d and type(inner[1]) is nn.BatchNorm1d  # the given modules unchanged


def cnn():
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 4 * 4, 5))


def test_localize_lean_trains_as_the_plain_network():
    """Three greedy steps in float64: the same parameters and running statistics, and the
    user's model holds them (shared tensors), under the same state_dict keys."""
    x, y = torch.randn(10, 3, 8, 8, dtype=F64), torch.randint(0, 5, (10,))
    nets = {}
    for lean in (False, True):
        torch.manual_seed(0)
        model = cnn().double()
        net = lp.localize(model, num_classes=5, lean=lean, example_input=x,
                          optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
        for _ in range(3):
            net.train_step(x, y)
        nets[lean] = (net, model)
    (plain, plain_model), (lean, lean_model) = nets[False], nets[True]
    assert_same(plain.state_dict(), lean.state_dict(), "net", atol=1e-12)
    assert_same(plain_model.state_dict(), lean_model.state_dict(), "model", atol=1e-12)
    assert lean_model[1].running_mean.abs().sum() > 0  # the statistics moved, in the user's model too


class Residual(nn.Module):
    """A model localize traces: BatchNorms in a block's own code and in forward's."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.blocks = nn.Sequential(lp.zoo.BasicBlock(4, 4), lp.zoo.BasicBlock(4, 6, stride=2))
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = self.blocks(torch.relu(self.bn(self.conv(x))))
        return self.fc(x.mean((2, 3)))


def test_make_lean_replaces_every_batchnorm_in_place_and_keeps_keys():
    model = Residual()
    before = dict(model.state_dict())
    replaced = make_lean(model)
    assert len(replaced) == 6  # the stem's, two per block, the projection's
    assert all(type(m) is BatchNorm for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    assert list(model.state_dict()) == list(before)
    assert all(model.state_dict()[k] is v or torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert model.bn.weight is replaced[0][2].weight  # shared, not copied


def test_localize_lean_trains_a_traced_model_as_the_plain_one():
    """Three greedy steps of a traced ResNet-like model in float64, with checkpointing
    inside nodes: the same parameters and running statistics."""
    x, y = torch.randn(10, 3, 8, 8, dtype=F64), torch.randint(0, 5, (10,))
    states = []
    for lean in (False, True):
        torch.manual_seed(0)
        model = Residual().double()
        net = lp.localize(model, num_classes=5, lean=lean, example_input=x, checkpoint=True, nodes=2,
                          optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
        assert any(type(m) is BatchNorm for m in net.modules()) == lean  # the nodes call the lean layers
        for _ in range(3):
            net.train_step(x, y)
        states.append(model.state_dict())
    assert_same(states[0], states[1], "model", atol=1e-12)


def test_localize_lean_undoes_its_replacement_on_an_error():
    model = Residual()
    with pytest.raises(ValueError, match="no submodule 'nope'"):
        lp.localize(model, num_classes=5, lean=True, split_points=["nope"])
    assert all(type(m) in (nn.BatchNorm2d,) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


@pytest.mark.skipif(memory.cpu_counter() is None, reason="needs the C++ extension's counting allocator")
def test_lean_node_step_holds_less():
    """A BatchNorm + ReLU node: the step's peak (allocator bytes) drops by at least half a
    map, the gradient at the BatchNorm's output it no longer holds whole."""
    x, y = torch.randn(32, 8, 16, 16), torch.randint(0, 5, (32,))
    peaks = {}
    for lean in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 5))
        net = lp.localize(model, num_classes=5, lean=lean, example_input=x)
        peaks[lean] = memory.measure_step(net, x, y).peak_bytes
    assert peaks[True] <= peaks[False] - x.numel() * x.element_size() // 2


@pytest.mark.skipif(memory.cpu_counter() is None, reason="needs the C++ extension's counting allocator")
def test_lean_batchnorm_step_holds_less():
    """A convolution then a BatchNorm (no ReLU after it): the node step's peak drops by at
    least half a map, the temporary of the map's size PyTorch's backward allocates."""
    x, y = torch.randn(32, 8, 16, 16), torch.randint(0, 5, (32,))
    peaks = {}
    for lean in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 16 * 16, 5))
        net = lp.localize(model, num_classes=5, lean=lean, example_input=x, nodes=1)
        peaks[lean] = memory.measure_step(net, x, y).peak_bytes
    assert peaks[True] <= peaks[False] - x.numel() * x.element_size() // 2
