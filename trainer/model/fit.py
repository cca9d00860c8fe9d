"""Train the suffix (new head, optionally the last blocks) on cached prefix features.

Seeded (parameters, shuffling and dropout all come from ``seed``), class-balanced by inverse-frequency
loss weights, early-stopped on validation NLL with the best epoch's weights restored, with a tqdm
progress bar and optional checkpoints (``best.pt`` and ``last.pt``; a run with the same fingerprint
resumes from ``last.pt``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from trainer.model.backbone import Suffix


class FitConfig(BaseModel):
    """Optimisation settings of the suffix."""

    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(default=60, ge=1)
    patience: int = Field(default=10, ge=1)
    """Stop after this many epochs without a better validation NLL."""
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=2e-3, gt=0)
    """Learning rate of the new head; unfrozen blocks use a tenth of it."""
    weight_decay: float = Field(default=1e-3, ge=0)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    balance: bool = True
    """Weight the loss by inverse class frequency."""
    seed: int = 0
    restore_best: bool = True
    """Keep the weights of the best validation epoch (early stopping); False keeps the last epoch's."""


@dataclass
class FitResult:
    best_epoch: int
    epochs_run: int
    best_val_nll: float
    best_val_accuracy: float
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int | None = None


@dataclass
class _Best:
    nll: float = math.inf
    acc: float = 0.0
    epoch: int = -1
    state: list[torch.Tensor] = field(default_factory=list)


def class_weights(y: np.ndarray, num_classes: int) -> torch.Tensor:
    """``n / (C * n_c)`` per class (classes without samples get weight 0)."""
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    w = np.divide(len(y), num_classes * counts, out=np.zeros(num_classes), where=counts > 0)
    return torch.tensor(w, dtype=torch.float32)


def predict_logits(suffix: Suffix, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """Suffix outputs (logits) for cached prefix features, in eval mode."""
    suffix.eval()
    outs = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            outs.append(suffix(torch.from_numpy(x[i : i + batch])).numpy())
    return np.concatenate(outs) if outs else np.zeros((0, int(suffix.m._fc.out_features)), np.float32)


def _state(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def _load(params: list[torch.nn.Parameter], state: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, s in zip(params, state):
            p.copy_(s)


def fit_suffix(
    suffix: Suffix,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    config: FitConfig,
    *,
    num_classes: int,
    checkpoint_dir: str | Path | None = None,
    fingerprint: str = "",
    progress: bool = True,
) -> FitResult:
    """Train ``suffix`` in place; returns the history with the best epoch's weights loaded."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    params = suffix.parameters_to_train()
    opt = _optimizer(suffix, params, config)
    weight = class_weights(y_train, num_classes) if config.balance else None
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train.astype(np.int64))
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    run = _resume(ckpt, config, fingerprint, params, opt, gen)
    bar = tqdm(range(run.start, config.epochs), desc="train", unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        if run.best.epoch >= 0 and epoch - run.best.epoch > config.patience:
            break
        train_loss = _train_epoch(suffix, opt, loss_fn, xt, yt, gen, config.batch_size)
        val_nll, val_acc = _validate(suffix, x_val, y_val.astype(np.int64))
        run.history.append(
            {"epoch": epoch, "train_loss": train_loss, "val_nll": val_nll, "val_accuracy": val_acc}
        )
        bar.set_postfix(loss=f"{train_loss:.3f}", val_nll=f"{val_nll:.3f}", val_acc=f"{val_acc:.3f}")
        if val_nll < run.best.nll - 1e-4:
            run.best = _Best(val_nll, val_acc, epoch, _state(params))
            if ckpt is not None:
                _save(
                    ckpt / "best.pt", {"epoch": epoch, "params": run.best.state, "fingerprint": fingerprint}
                )
        if ckpt is not None:
            _save(ckpt / "last.pt", _checkpoint(epoch, params, opt, gen, run, fingerprint, config))
    bar.close()
    if config.restore_best:
        _load(params, run.best.state)
    suffix.eval()
    return FitResult(
        best_epoch=run.best.epoch,
        epochs_run=len(run.history),
        best_val_nll=run.best.nll,
        best_val_accuracy=run.best.acc,
        seconds=time.perf_counter() - t0,
        history=run.history,
        resumed_from=run.resumed_from,
    )


def _optimizer(suffix: Suffix, params: list[torch.nn.Parameter], config: FitConfig) -> torch.optim.Optimizer:
    """AdamW with the new head at ``lr`` and unfrozen backbone blocks at a tenth of it."""
    head = list(suffix.m._fc.parameters())
    head_ids = {id(p) for p in head}
    groups: list[dict[str, Any]] = [{"params": head, "lr": config.lr}]
    rest = [p for p in params if id(p) not in head_ids]
    if rest:
        groups.append({"params": rest, "lr": config.lr / 10})
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay)


@dataclass
class _Run:
    """Where training starts (fresh or resumed from ``last.pt``) and what it has seen so far."""

    start: int
    history: list[dict[str, float]]
    best: _Best
    resumed_from: int | None = None


def _resume(
    ckpt: Path | None,
    config: FitConfig,
    fingerprint: str,
    params: list[torch.nn.Parameter],
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
) -> _Run:
    """Continue from ``last.pt`` when it was written for the same data and config (more epochs may be
    asked for); else start fresh."""
    fresh = _Run(0, [], _Best(state=_state(params)))
    if ckpt is None or not (ckpt / "last.pt").is_file():
        return fresh
    saved = torch.load(ckpt / "last.pt", weights_only=False)
    same = {k: v for k, v in saved.get("config", {}).items() if k != "epochs"} == config.model_dump(
        exclude={"epochs"}
    )
    if saved.get("fingerprint") != fingerprint or not same:
        return fresh
    _load(params, saved["params"])
    opt.load_state_dict(saved["optimizer"])
    gen.set_state(saved["generator"])
    torch.set_rng_state(saved["torch_rng"])
    return _Run(saved["epoch"] + 1, saved["history"], _Best(**saved["best"]), saved["epoch"])


def _train_epoch(
    suffix: Suffix,
    opt: torch.optim.Optimizer,
    loss_fn: torch.nn.Module,
    xt: torch.Tensor,
    yt: torch.Tensor,
    gen: torch.Generator,
    batch_size: int,
) -> float:
    """One pass over the training features in a seeded order; the mean training loss."""
    suffix.train()
    perm = torch.randperm(len(xt), generator=gen)
    total = 0.0
    for i in range(0, len(perm), batch_size):
        idx = perm[i : i + batch_size]
        opt.zero_grad()
        loss = loss_fn(suffix(xt[idx]), yt[idx])
        loss.backward()
        opt.step()
        total += loss.item() * len(idx)
    return total / len(perm)


def _validate(suffix: Suffix, x_val: np.ndarray, yv: np.ndarray) -> tuple[float, float]:
    """Validation NLL and accuracy of the current weights."""
    logits = predict_logits(suffix, x_val)
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(-logp[np.arange(len(yv)), yv].mean()), float((logits.argmax(1) == yv).mean())


def _checkpoint(
    epoch: int,
    params: list[torch.nn.Parameter],
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    run: _Run,
    fingerprint: str,
    config: FitConfig,
) -> dict[str, Any]:
    """Everything :func:`_resume` needs to continue after ``epoch``."""
    return {
        "epoch": epoch,
        "params": _state(params),
        "optimizer": opt.state_dict(),
        "generator": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "history": run.history,
        "best": run.best.__dict__,
        "fingerprint": fingerprint,
        "config": config.model_dump(),
    }


def _save(path: Path, obj: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)
