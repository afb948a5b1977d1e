"""localprop: local learning for PyTorch.

Every node (a layer or block) learns from a local objective and updates at once, so the
activations and gradients of the whole network are never held together.

    import localprop as lp
    net = lp.LocalSequential(lp.LocalLinear(64, 256), lp.LocalLinear(256, 10, activation=None),
                             rule="greedy", num_classes=10)
    net = lp.mlp([64, 256, 10], rule="greedy")  # the same network from its widths
    stats = net.train_step(x, y)

Importing localprop never initialises CUDA.
"""
from . import checkpoint, exits, lean, memory, objectives, ops, rules, zoo
from .engine import LocalSequential, Prediction
from .graph import LocalGraph
from .hooked import HookedNetwork
from .localize import localize
from .models import mlp, mlp_nodes
from .nodes import LocalLinear, ModuleNode, Node
from .ops import BackendUnavailable

__version__ = "0.1.0"

__all__ = ["LocalSequential", "LocalGraph", "HookedNetwork", "LocalLinear", "ModuleNode", "Node", "Prediction",
           "localize", "mlp", "mlp_nodes", "checkpoint", "exits", "lean", "memory", "objectives", "ops", "rules", "zoo",
           "BackendUnavailable", "__version__"]
