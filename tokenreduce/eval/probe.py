"""A linear probe (multinomial logistic regression) on frozen features, and a kNN classifier."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class LinearProbe:
    """Standardised features -> class logits."""

    mean: Tensor
    std: Tensor
    weight: Tensor
    bias: Tensor

    @classmethod
    def fit(cls, features: Tensor, labels: Tensor, classes: int, l2: float = 1e-3, steps: int = 100) -> LinearProbe:
        """Fit by L-BFGS on the full batch (deterministic): cross-entropy plus ``l2`` times the squared
        weights, on features standardised with the training set's statistics."""
        with torch.inference_mode(False), torch.enable_grad():  # features may come from inference mode
            x = features.clone().double()
            mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
            x = (x - mean) / std
            labels = labels.clone()
            weight = torch.zeros(classes, x.shape[1], dtype=torch.float64, requires_grad=True)
            bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
            optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

            def loss() -> Tensor:
                optimizer.zero_grad()
                value = F.cross_entropy(x @ weight.T + bias, labels) + l2 * weight.pow(2).sum()
                value.backward()
                return value

            optimizer.step(loss)
        return cls(mean, std, weight.detach(), bias.detach())

    def predict(self, features: Tensor) -> Tensor:
        return (((features.double() - self.mean) / self.std) @ self.weight.T + self.bias).argmax(dim=1)


def knn_predict(queries: Tensor, gallery: Tensor, labels: Tensor, k: int = 20) -> Tensor:
    """Majority vote of the ``k`` most cosine-similar gallery features (ties to the lower class)."""
    sim = F.normalize(queries.float(), dim=1) @ F.normalize(gallery.float(), dim=1).T
    nearest = labels[sim.topk(min(k, gallery.shape[0]), dim=1).indices]  # [Q, k]
    votes = F.one_hot(nearest, int(labels.max()) + 1).sum(dim=1)
    return votes.argmax(dim=1)
