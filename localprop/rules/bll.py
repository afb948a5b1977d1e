"""Block-local learning with a feedback network (after Kappel et al., arXiv 2305.14974).

The paper's equations could not be read; the formulation here is the library's own
reconstruction (see the class docstring).
"""
from __future__ import annotations

import functools
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import check_callable, check_choice, check_float
from ..objectives import show_shape
from .base import LocalRule, Messages, NodeStep

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]

#: how a node's output becomes the features aligned with the prototypes (see pool)
FEATURES = ("auto", "centred", "pooled")
#: how the feedback network is wired (see BLL): each b_k fed by b_{k+1}, or by the labels
FEEDBACKS = ("chain", "direct")

#: the feedback network's optimizer when none is given
DEFAULT_FEEDBACK_OPTIMIZER: OptimizerFactory = functools.partial(torch.optim.Adam, lr=1e-2)


class BLL(LocalRule):
    """Block-local learning: forward features are aligned with class prototypes that a
    separate feedback network computes from the labels alone.

    For nodes k < K (the last node K learns from its own output, L_K = CE(h_K, y)):

        α_k = normalize(pool(h_k))                     [B, D_k], unit rows; pool = identity for
                                                       [C] features, adaptive average pooling
                                                       to 2 (2x2) positions for maps (features=
                                                       "pooled"), or the released code's global
                                                       max-pool to [B, C] minus each sample's
                                                       mean over channels ("centred", the
                                                       default for maps)
        β_K = onehot(y),  β_k = b_k(β_{k+1})           b_k: Linear(D_{k+1}, D_k), no bias
                                                       (feedback="chain", the default), or
        β_k = b_k(onehot(y))                           b_k: Linear(classes, D_k) (feedback=
                                                       "direct", the released code's)
        L_k = −mean_b cos(α_k(b), sg β_k(b)) + lam_dec · mean_{b≠b'} (α_k αᵀ_k)²_{bb'}
              + lam_cls · CE(p_k(h_k), y)              p_k: the node's head

    The β's depend only on the labels, so they are computed before the forward pass (no
    weight transport: b_k has its own weights). Each b_k learns the class prototypes of
    the forward features with its own loss and optimizer, right after node k's update:
    mean_b ‖b_k(sg β_{k+1}(b)) − sg α_k(b)‖². The features are aligned with the prototypes
    (the released code's sign would anti-align them). The decorrelation term spreads the
    samples of a batch apart, so the features do not collapse onto one direction.
    On fused nodes, L_k runs with autograd on a detached h_k and the node learns BP-free
    from g = ∂L_k/∂h_k; its linear head is stepped by the fused update (both inside
    :meth:`~localprop.nodes.Node.local_step`).

    Args:
        lam_dec: weight of the decorrelation term, >= 0 (default 1.0: at 0.1 the deeper nodes
            drift to ~90% on digits while node 0 stays at 94%; at 1.0 every node is >= 96%).
        lam_cls: weight of the linear predictor's cross-entropy, >= 0 (default 1.0: at 0.1
            the features of a localized CNN shrink towards 0, as alignment and decorrelation
            are blind to scale, and the next node starves; 82% vs 94% on digits after 3-5 epochs).
        feedback_optimizer: factory ``params -> Optimizer`` for each b_k (default Adam lr 1e-2).
        features: how a node's output becomes α_k: "centred" or "pooled" (see above), or
            "auto" (default): "centred" for maps, [C] features as they are. Measured by
            bench/rules/converge.py on MNIST-1D (3 seeds, lr swept; the heads of maps then
            linear): the 1-D CNN at 4 / 8 nodes reaches 93.1 / 94.6% with "centred" against
            90.4 / 86.7% with "pooled" (bp: 92.7 / 95.5); on the MLP, centring [C] features lost 1.0 / 1.5 points (61.8 / 60.7%
            against 62.8 / 62.2%), hence "auto".
        feedback: "chain" (default) or "direct" (see above). "direct" needs no top-down
            message: in a pipeline each rank's prototypes come from its own b_k. Measured by
            bench/rules/converge.py on MNIST-1D (3 seeds, lr swept), test % at CNN 4 / CNN 8
            / MLP 4 / MLP 8 nodes: chain 92.9 / 93.4 / 62.8 / 62.2, direct 93.5 / 93.1 /
            61.6 / 62.2 (mean validation accuracy 79.3 against 79.2): a tie, so the default
            stays the chain.

    State: ``net.rule_state.feedback`` (the b_k, an nn.ModuleList) and
    ``net.rule_state.optimizers``. StepResult.extra["feedback_loss"]: node name -> its b_k's loss.
    """

    name = "bll"
    uses_heads = True
    figures = ("feedback_loss",)

    def __init__(self, lam_dec: float = 1.0, lam_cls: float = 1.0,
                 feedback_optimizer: OptimizerFactory | None = None, features: str = "auto",
                 feedback: str = "chain") -> None:
        self.features = check_choice("BLL", "features", features, FEATURES)
        self.feedback = check_choice("BLL", "feedback", feedback, FEEDBACKS)
        self.lam_dec = check_float("BLL", "lam_dec", lam_dec, 0)
        self.lam_cls = check_float("BLL", "lam_cls", lam_cls, 0)
        self.feedback_optimizer = check_callable("BLL", "feedback_optimizer", feedback_optimizer,
                                                 "params -> Optimizer") or DEFAULT_FEEDBACK_OPTIMIZER

    @property
    def messages(self) -> Messages:
        # chained: the prototypes P [classes, D] at a run's first node travel back every step
        return Messages(top_down="step") if self.feedback == "chain" else Messages()

    def attach(self, net) -> None:
        if not net.objective.classes or len(net.output_spec) != 1:
            raise ValueError(f"rule 'bll' aligns each sample's features with the prototype of its class: it needs "
                             f"class labels per sample (loss 'cross_entropy', output [B, C]), not loss "
                             f"{net.objective.name!r} on outputs [B, {show_shape(net.output_spec)}]")
        dims = [feature_dim(node.output_shape, self.features) for node in net.nodes[:-1]] + [net.num_classes]
        like = next(net.nodes[0].parameters())
        fed = dims[1:] if self.feedback == "chain" else [net.num_classes] * (len(dims) - 1)
        feedback = nn.ModuleList(nn.Linear(fed[k], dims[k], bias=False, device=like.device, dtype=like.dtype)
                                 for k in range(len(dims) - 1))
        net.rule_state = nn.ModuleDict({"feedback": feedback})
        net.rule_state.optimizers = [self.feedback_optimizer(b.parameters()) for b in feedback]

    def prototypes(self, net, top: torch.Tensor | None = None,
                   nodes: range | None = None) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """The class prototypes, from the labels alone: each b_k maps one row per class,
        so a batch's β's are rows of these matrices (β_k = P_k[y]), computed before the
        forward pass and without gradients. With feedback="direct" every b_k's input is
        the one-hot matrix I [classes, classes] and ``top`` is unused.

        Args:
            top: P_{e+1} [classes, D_{e+1}], the input of b_e for the last node e of
                ``nodes`` (default: onehot of the classes, e = K-1's own input).
            nodes: the nodes whose b_k to run, downwards from the last (default: all).
        Returns:
            ({k: P_{k+1}, the input of b_k} for k in nodes below K-1, and P_{first} [classes,
            D_first], the input of the b just before ``nodes``: what a pipeline stage sends back).
        """
        nodes = range(len(net.nodes)) if nodes is None else nodes
        like = next(net.nodes[0].parameters())
        p = torch.eye(net.num_classes, dtype=like.dtype, device=like.device) if top is None else top
        inputs = {}
        with torch.no_grad():
            for k in reversed(nodes):
                if k < len(net.nodes) - 1:
                    inputs[k] = p if self.feedback == "chain" else self._labels(net)
                    p = net.rule_state.feedback[k](inputs[k])
        return inputs, p

    def before_step(self, net, step):
        """Each node k < K's message: P_{k+1}, from :meth:`prototypes`, before the forward
        pass (chained feedback; direct feedback needs none)."""
        return self.prototypes(net)[0] if self.feedback == "chain" else {}

    @staticmethod
    def _labels(net) -> torch.Tensor:
        """I [classes, classes]: every class's one-hot code, direct feedback's input."""
        like = next(net.rule_state.feedback.parameters())
        return torch.eye(net.num_classes, dtype=like.dtype, device=like.device)

    def prepare(self, net, nodes, top):
        return self.prototypes(net, top, nodes)

    def top_shape(self, net, last):  # from the feedback nets' sizes: later ones may be released
        return net.num_classes, net.rule_state.feedback[last].in_features

    def node_state(self, net, k):
        return list(net.rule_state.feedback[k].parameters()) if k < len(net.nodes) - 1 else []

    def node_step(self, net, k: int, u: torch.Tensor, y: torch.Tensor, message: torch.Tensor | None,
                  step: int) -> NodeStep:
        """Train node k on input u [B, ...] (detached) against β_k = b_k(P_{k+1})[y], then b_k;
        message: P_{k+1} [classes, D_{k+1}] from :meth:`prototypes` (chained feedback; None
        for the last node, which learns from its own cross-entropy, and with direct
        feedback, whose input is I). Returns h_k, L_k and b_k's loss as the figure
        "feedback_loss"."""
        node = net.nodes[k]
        if k == len(net.nodes) - 1:
            r = node.local_step(u, step, labels=y)
            return NodeStep(r.h, r.loss)
        feedback = net.rule_state.feedback[k]
        # P_k [classes, D_k], kept for b_k's own step
        pred = feedback(message if self.feedback == "chain" else self._labels(net))
        beta, kept = pred.detach()[y], {}

        def objective(h, head):
            loss, kept["alpha"] = self.objective(h, head(h) if self.lam_cls else None, y, beta)
            return loss

        r = node.local_step(u, step, loss=objective)
        fb_loss = _train_feedback(pred[y], net.rule_state.optimizers[k], kept["alpha"])
        node.check_update(feedback.parameters(), step, owner=net.rule_state)
        return NodeStep(r.h, r.loss, figures={"feedback_loss": fb_loss})

    def objective(self, h: torch.Tensor, logits: torch.Tensor | None, y: torch.Tensor,
                  beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_k, α_k detached) from h_k [B, C, ...], the head's logits [B, classes] (or None
        when lam_cls = 0) and β_k [B, D]."""
        alpha = F.normalize(pool(h, self.features), dim=1)
        loss = -F.cosine_similarity(alpha, beta, dim=1).mean()
        if self.lam_dec and len(y) > 1:
            gram = alpha @ alpha.t()
            off = gram - torch.diag_embed(torch.diagonal(gram))
            loss = loss + self.lam_dec * off.pow(2).sum() / (len(y) * (len(y) - 1))
        if logits is not None:
            loss = loss + self.lam_cls * F.cross_entropy(logits, y)
        return loss, alpha.detach()

    def __repr__(self) -> str:
        return (f"BLL(lam_dec={self.lam_dec}, lam_cls={self.lam_cls}, features={self.features!r}, "
                f"feedback={self.feedback!r})")


def pool(h: torch.Tensor, features: str = "auto") -> torch.Tensor:
    """[B, D] features of h. "pooled": [B, C] as they are; [B, C, L] and [B, C, H, W]
    average-pooled to 2 (2x2) positions and flattened (D = 2C, 4C), so that a few channels
    still give room for 10 class directions; other shapes flattened. "centred" (the released code's): maps max-pooled over all positions
    to [B, C], then each sample's mean over the channels subtracted. "auto": "centred"
    for maps, [B, C] as they are."""
    if features == "auto":
        features = "centred" if h.dim() > 2 else "pooled"
    if features == "centred":
        flat = h.flatten(2).amax(2) if h.dim() > 2 else h
        return flat - flat.mean(1, keepdim=True)
    if h.dim() == 3:
        return F.adaptive_avg_pool1d(h, 2).flatten(1)
    if h.dim() == 4:
        return F.adaptive_avg_pool2d(h, 2).flatten(1)
    return h.flatten(1)


def feature_dim(shape: tuple[int, ...], features: str = "auto") -> int:
    """D of :func:`pool` for per-sample ``shape``."""
    return pool(torch.zeros(1, *shape, device="meta"), features).shape[1]


def _train_feedback(pred: torch.Tensor, optimizer, alpha: torch.Tensor) -> torch.Tensor:
    """One step of mean_b ‖pred(b) − α(b)‖², pred = b(P_{k+1})[y] [B, D] with its graph
    (b runs once per class, not per sample); returns the loss before it."""
    loss = (pred - alpha).pow(2).sum(1).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()
