"""``digits-cnn``: a small CNN on scikit-learn's 8x8 handwritten digits.

The 1797 images are split once (80/20, stratified, ``random_state=0``) into
1437 training and 360 test images. The middle layers have 32 and 1024 input
features, so their MX blocks are full. The first and last layers stay fp32
under the default quantization config.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from mfqat_onnx.qat import TrainRecipe
from models._registry import Workload, WorkloadData

SPLIT_SEED = 0
TEST_FRACTION = 0.2


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions (1 → 32 → 64 channels), one 2x2 max-pool, two linear layers."""

    def __init__(self, channels: int = 32, width: int = 64, hidden: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, width, 3, padding=1)
        self.fc1 = nn.Linear(width * 4 * 4, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Map images ``[N, 1, 8, 8]`` to class logits ``[N, num_classes]``."""
        x = F.relu(self.conv1(images))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def build_model(**kwargs: int) -> DigitsCNN:
    """Return a freshly initialized ``DigitsCNN``."""
    return DigitsCNN(**kwargs)


def load_data() -> WorkloadData:
    """Load the digits and split them; pixels (0..16) are scaled to [-1, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        range(len(labels)), test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=digits.target
    )
    train_idx, test_idx = torch.tensor(train_idx), torch.tensor(test_idx)
    return WorkloadData(
        train=TensorDataset(images[train_idx], labels[train_idx]),
        eval=TensorDataset(images[test_idx], labels[test_idx]),
    )


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Return the cross-entropy of ``model`` on ``(images, labels)``."""
    images, labels = batch
    return F.cross_entropy(model(images), labels)


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorDataset, batch_size: int = 512) -> dict[str, float]:
    """Return test ``accuracy`` (%) and mean cross-entropy ``loss``."""
    model.eval()
    images, labels = data.tensors
    correct = 0
    total_loss = 0.0
    for start in range(0, len(labels), batch_size):
        logits = model(images[start : start + batch_size])
        target = labels[start : start + batch_size]
        correct += int((logits.argmax(-1) == target).sum())
        total_loss += float(F.cross_entropy(logits, target, reduction="sum"))
    return {"accuracy": 100.0 * correct / len(labels), "loss": total_loss / len(labels)}


def example_inputs(batch: int = 1, seq: int = 0) -> tuple[torch.Tensor, ...]:
    """Return a zero image batch ``[batch, 1, 8, 8]``; ``seq`` is unused."""
    return (torch.zeros(batch, 1, 8, 8),)


WORKLOAD = Workload(
    name="digits-cnn",
    description="small CNN on scikit-learn 8x8 digits (accuracy %)",
    build_model=build_model,
    load_data=load_data,
    loss_fn=loss_fn,
    evaluate=evaluate,
    metric="accuracy",
    higher_is_better=True,
    recipe=TrainRecipe(steps=400, batch_size=64, lr=2e-3, weight_decay=1e-4, warmup_steps=20),
    finetune_recipe=TrainRecipe(steps=150, batch_size=64, lr=5e-4, weight_decay=1e-4, warmup_steps=10),
    quant_defaults={},
    example_inputs=example_inputs,
    input_names=("images",),
    output_names=("logits",),
    dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
)
