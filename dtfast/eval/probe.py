"""Linear probe (multinomial logistic regression, full-batch L-BFGS) and weighted k-NN on frozen features.

Both are deterministic given the features: the probe starts from zero weights and uses full batches; the only
randomness is the seeded train/held-out split that picks the L2 strength.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["accuracy", "fit_logistic", "holdout_split_sizes", "knn_top1", "linear_probe", "min_train_images",
           "standardise"]


def standardise(train: torch.Tensor, *others: torch.Tensor, eps: float = 1e-6) -> list[torch.Tensor]:
    """Subtract the train mean and divide by the train std, per feature (statistics in float64, result float32).

    The std is the unbiased one. A feature whose train std is below ``eps`` (constant on train: a dead channel, or a
    single train row) is 0 in every split: dividing by ``eps`` would blow up the other splits' deviations from the
    train constant (1e4 and more) and swamp every other feature in a cosine similarity.
    """
    if train.shape[0] == 0:
        raise ValueError("standardise: no train rows to take the mean and std of")
    train64 = train.double()
    std = train64.std(0, keepdim=True, correction=1 if train.shape[0] > 1 else 0)
    std = std.nan_to_num(nan=0.0)
    mean, std = train64.mean(0, keepdim=True), torch.where(std < eps, torch.inf, std)
    return [((t.double() - mean) / std).float() for t in (train, *others)]


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float,
                 max_iter: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """argmin_W,b  mean_i CE(x_i W + b, y_i) + weight_decay / 2 * ||W||^2, from zero, by L-BFGS. (W (D, C), b (C,))."""
    weight = torch.zeros(x.shape[1], num_classes, dtype=x.dtype, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def accuracy(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> float:
    return float(((x @ weight + bias).argmax(1) == y).double().mean())


MIN_FIT_IMAGES = 2  # images the L2 search fits on, besides the held-out ones (at least 1)


def holdout_split_sizes(num_train: int, holdout: float) -> tuple[int, int]:
    """(held out, fit): the sizes of the split ``linear_probe`` makes to pick the L2 strength."""
    n_hold = max(1, round(holdout * num_train))
    return n_hold, num_train - n_hold


def min_train_images(holdout: float) -> int:
    """The fewest train images ``linear_probe`` accepts: 1 held out (more at larger ``holdout``) + 2 to fit."""
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    n = MIN_FIT_IMAGES + 1
    while holdout_split_sizes(n, holdout)[1] < MIN_FIT_IMAGES:
        n += 1
    return n


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 weight_decays: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1), holdout: float = 0.2,
                 max_iter: int = 200, seed: int = 0) -> dict:
    """Top-1 on val of a logistic regression on standardised features.

    The L2 strength is the one with the best accuracy on a seeded ``holdout`` part of the train split (ties: the
    stronger one); the probe is then refit on the whole train split with it.
    """
    n_hold, n_fit = holdout_split_sizes(train_x.shape[0], holdout)
    if n_fit < MIN_FIT_IMAGES:
        raise ValueError(f"linear probe: {train_x.shape[0]} train images; it needs at least "
                         f"{min_train_images(holdout)} ({n_hold} held out at holdout={holdout:g} to pick the L2 "
                         f"strength, {MIN_FIT_IMAGES} or more to fit)")
    if val_x.shape[0] == 0:
        raise ValueError("linear probe: no val images")
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(train_x.shape[0], generator=generator)
    hold, fit = order[:n_hold], order[n_hold:]
    fit_x, hold_x = standardise(train_x[fit], train_x[hold])
    search = {}
    for wd in sorted(float(w) for w in weight_decays):
        weight, bias = fit_logistic(fit_x, train_y[fit], num_classes, wd, max_iter)
        search[wd] = accuracy(hold_x, train_y[hold], weight, bias)
    best = max(sorted(search, reverse=True), key=lambda wd: search[wd])
    all_x, all_val = standardise(train_x, val_x)
    weight, bias = fit_logistic(all_x, train_y, num_classes, best, max_iter)
    return {"top1": accuracy(all_val, val_y, weight, bias), "train_top1": accuracy(all_x, train_y, weight, bias),
            "weight_decay": best, "holdout_top1": {str(k): v for k, v in search.items()}}


def knn_top1(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor, k: int = 20,
             temperature: float = 0.07, chunk: int = 1024) -> float:
    """Weighted k-NN (DINO's): cosine similarity of standardised features, vote weight exp(sim / T).

    The weights are taken relative to each row's nearest neighbour, exp((sim - sim_max) / T): the same vote, and no
    overflow to inf (which made every class tie) for small T.
    """
    train_s, val_s = (F.normalize(t, dim=1) for t in standardise(train_x, val_x))
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    k = min(k, train_s.shape[0])
    correct = 0
    for start in range(0, val_s.shape[0], chunk):
        sims, idx = (val_s[start:start + chunk] @ train_s.T).topk(k, dim=1)
        votes = torch.zeros(idx.shape[0], num_classes, dtype=sims.dtype)
        votes.scatter_add_(1, train_y[idx], ((sims - sims[:, :1]) / temperature).exp())
        correct += int((votes.argmax(1) == val_y[start:start + chunk]).sum())
    return correct / val_s.shape[0]
