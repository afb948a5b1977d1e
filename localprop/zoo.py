"""Reference models written as users write them: plain ``nn.Module`` classes with the
functional ops in ``forward`` (residual adds, ``F.relu``, ``torch.flatten``), not
``nn.Sequential`` stacks. They are what the tests, ``bench/real_models.py`` and
``localprop profile --model`` localize; any model of the same kind localizes the same way.

    net = lp.localize(lp.zoo.resnet18(), nodes=4)                  # 3x32x32 images, 10 classes
    net = lp.localize(lp.zoo.gpt(vocab=256, layers=6), nodes=4)    # token ids [B, T] -> [B, T, 256]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 convolutions with batch norm, a residual add (through
    a 1x1 projection when the shape changes). [B, C_in, H, W] -> [B, C_out, H/s, W/s]."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(nn.Module):
    """A CIFAR-style ResNet: a 3x3 stem, four stages of BasicBlocks (widths w, 2w, 4w, 8w;
    strides 1, 2, 2, 2), global average pooling and a linear classifier.
    [B, 3, H, W] float -> logits [B, classes]."""

    def __init__(self, blocks: tuple[int, ...] = (2, 2, 2, 2), width: int = 64, classes: int = 10,
                 channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        cin, stages = width, []
        for k, count in enumerate(blocks):
            cout = width * 2 ** k
            stages.append(nn.Sequential(*[BasicBlock(cin if i == 0 else cout, cout, 2 if i == 0 and k else 1)
                                          for i in range(count)]))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet18(width: int = 64, classes: int = 10) -> ResNet:
    """ResNet-18's shape (2, 2, 2, 2 BasicBlocks) for 3xHxW images."""
    return ResNet((2, 2, 2, 2), width, classes)


class TransformerBlock(nn.Module):
    """A pre-norm transformer layer: self-attention (causal, or with a padding mask
    [B, T] bool, True = a real token) and a 4x MLP, each with a residual add.
    [B, T, D] -> [B, T, D]."""

    def __init__(self, dim: int, heads: int, causal: bool = True) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        keep = None if mask is None else mask[:, None, None, :]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, is_causal=self.causal and mask is None)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, D))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A GPT-2-shaped causal language model: token and position embeddings, ``layers``
    TransformerBlocks, a final LayerNorm and an untied output projection.
    Token ids [B, T] int64 (T <= context) -> logits [B, T, vocab]."""

    def __init__(self, vocab: int = 256, dim: int = 256, layers: int = 6, heads: int = 4,
                 context: int = 256) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def gpt(vocab: int = 256, dim: int = 256, layers: int = 6, heads: int = 4, context: int = 256) -> GPT:
    """A GPT-2-small-shaped LM at a size of one's choice (default 6 layers, d = 256)."""
    return GPT(vocab, dim, layers, heads, context)


class Encoder(nn.Module):
    """A BERT-like classifier: token and position embeddings, bidirectional
    TransformerBlocks that take a padding mask, a final LayerNorm, the mean of the real
    tokens' features and a linear classifier.
    Token ids [B, T], attention_mask [B, T] bool (default: all real) -> logits [B, classes]."""

    def __init__(self, vocab: int = 256, dim: int = 64, layers: int = 4, heads: int = 4, classes: int = 4,
                 context: int = 128) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, causal=False) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, classes)

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x, attention_mask)
        weights = attention_mask.to(x.dtype).unsqueeze(-1)
        return self.fc(self.ln_f((x * weights).sum(1) / weights.sum(1).clamp_min(1)))


class ViT(nn.Module):
    """A small vision transformer: a strided-conv patch embedding, a learnt position
    embedding, bidirectional TransformerBlocks, mean pooling and a linear classifier.
    [B, C, H, W] float (H, W = ``image``) -> logits [B, classes]."""

    def __init__(self, image: int = 32, patch: int = 4, dim: int = 64, layers: int = 4, heads: int = 4,
                 classes: int = 10, channels: int = 3) -> None:
        super().__init__()
        self.patch = nn.Conv2d(channels, dim, patch, patch)
        self.pos = nn.Parameter(torch.zeros(1, (image // patch) ** 2, dim))
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, causal=False) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.fc(self.ln_f(x.mean(1)))
