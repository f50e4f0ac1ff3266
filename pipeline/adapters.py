"""Cross-fitted dataset adapters on frozen image and text features (after the authors' earlier CLIP-based selection).

Each tower maps its frozen feature linearly into one shared space of ``S`` dimensions and adds a
CLIP-Adapter style residual MLP there (``u = normalize(h + alpha * MLP(h))``, ``W2`` starting at
zero), trained with cross-entropy over all ``C`` class prompts at a learned temperature. For aligned
towers of equal width the projections start at the identity, so training starts from zero-shot
CLIP; for unaligned towers they are what makes the towers comparable at all.

Cross-fitting: for each of ``folds`` label-stratified folds an adapter pair is trained on the other
folds and applied to that fold, so every sample's class cosines and probabilities come from
adapters that never saw its label; ``train_mask`` trims suspects out of training. Design and
measurements: docs/pipeline.md, "Design notes: pipeline/adapters.py".
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dds.errors import DdsError
from dds.pipeline.verdict import row_blocks

log = logging.getLogger(__name__)

ALPHA = 0.2  # residual weight of the adapter MLP (CLIP-Adapter)
SHARED_DIM = 256  # width of the shared space for towers of different widths
TAU_INIT = 0.07  # initial softmax temperature (CLIP's)
EPOCHS = 4  # per fold; on Fashion-MNIST with 40% noise, 10+ epochs fit the noise (out-of-fold accuracy fell)
ZERO_SHOT_TAU = 0.01  # temperature for zero-shot probabilities (CLIP's logit scale 100)
#: Rows an adapter trains on at most (a seeded random subset of its folds' rows above that). Training
#: costs ~60 us per row and epoch on 2 cores at 512-d x 1000 classes, so ImageNet-1k's 1M rows per
#: fold x 4 epochs x 5 folds x 3 passes would take over an hour; every dataset of up to 125k samples
#: (5 folds) trains on all its rows.
MAX_TRAIN_ROWS = 100_000
APPLY_ROWS = 65_536  # held-out rows embedded by a fold's adapter at a time


@dataclass
class ClassScores:
    """Class cosines and probabilities of ``N`` samples, computed block by block on demand.

    Nothing ``(N, C)`` is held: ImageNet-1k's 1.28M x 1000 would be 5 GB per array. Row ``i`` is
    scored against the class embeddings ``text[group[i]]`` with temperature ``tau[group[i]]`` (the
    adapter of the fold that did not see it; a single group for zero-shot scores).

    Attributes:
        emb: ``(N, S)`` float32 L2-normalised image embeddings in the class space (not copied).
        text: ``(G, C, S)`` float32 L2-normalised class embeddings, one set per group.
        group: ``(N,)`` int64 group of each row.
        tau: ``(G,)`` softmax temperatures.
    """

    emb: np.ndarray
    text: np.ndarray
    group: np.ndarray
    tau: np.ndarray

    def __len__(self) -> int:
        return len(self.emb)

    @property
    def num_classes(self) -> int:
        return self.text.shape[1]

    def block(self, rows: slice) -> tuple[np.ndarray, np.ndarray]:
        """``(cos, probs)`` of the rows ``rows``: both ``(b, C)`` float32 (probs: softmax of ``cos / tau``).

        In torch: its multi-threaded matmul and softmax beat numpy here (docs/pipeline.md).
        """
        e = torch.from_numpy(np.ascontiguousarray(self.emb[rows], dtype=np.float32))
        g = self.group[rows]
        cos = torch.empty((len(e), self.num_classes))
        probs = torch.empty_like(cos)
        for k in np.unique(g):
            at = slice(None) if (g == k).all() else torch.from_numpy(np.flatnonzero(g == k))
            c = e[at] @ torch.from_numpy(np.ascontiguousarray(self.text[k], dtype=np.float32)).T
            cos[at], probs[at] = c, torch.softmax(c / float(self.tau[k]), dim=1)
        return cos.numpy(), probs.numpy()

    def blocks(self) -> Iterator[slice]:
        """Consecutive row slices covering all rows (:func:`dds.pipeline.verdict.row_blocks`)."""
        return row_blocks(len(self), self.num_classes)

    def dense(self) -> tuple[np.ndarray, np.ndarray]:
        """``(cos, probs)`` of every row, ``(N, C)`` each: for small data and tests only."""
        return self.block(slice(None))


@dataclass
class CrossFit:
    """Cross-fitted adapter outputs; row ``i`` is produced by the adapter of fold ``fold[i]``.

    Attributes:
        u: ``(N, S)`` float32 adapted, L2-normalised image embeddings.
        text: ``(K, C, S)`` float32 adapted, L2-normalised class embeddings of each fold's adapter.
        fold: ``(N,)`` int64 fold of each sample (its adapter was trained without that fold).
        tau: ``(K,)`` learned temperature of each fold's adapter.
    """

    u: np.ndarray
    text: np.ndarray
    fold: np.ndarray
    tau: np.ndarray

    @property
    def scores(self) -> ClassScores:
        """Each sample's class cosines and probabilities from its own fold's adapter, on demand."""
        return ClassScores(emb=self.u, text=self.text, group=self.fold, tau=self.tau)


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Assign each sample to one of ``folds`` folds, balanced within every label.

    Args:
        labels: ``(N,)`` ints.
        folds: number of folds (>= 2).
        seed: seed of the shuffle within each label.

    Returns:
        ``(N,)`` int64 fold ids in ``0..folds-1``; each label's samples are spread round-robin
        over the folds after a seeded shuffle, so fold sizes differ by at most one per label.
    """
    if folds < 2:
        raise DdsError(f"folds must be at least 2 for cross-fitting, got {folds}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    offset = 0
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        fold[rows] = (np.arange(len(rows)) + offset) % folds
        offset += len(rows)  # continue the round-robin, so small classes do not all start at fold 0
    return fold


def _build(d_img: int, d_txt: int, shared_dim: int):
    """The image and text adapter towers and the log-temperature, as torch modules."""
    class Tower(nn.Module):
        """``normalize(h + alpha * MLP(h))`` with ``h = P z``; the MLP's last layer starts at zero."""

        def __init__(self, d: int, out: int) -> None:
            super().__init__()
            self.proj = nn.Linear(d, out, bias=False)
            if d == out:
                nn.init.eye_(self.proj.weight)
            else:
                nn.init.orthogonal_(self.proj.weight)
            hidden = max(1, out // 4)
            self.mlp = nn.Sequential(nn.Linear(out, hidden), nn.ReLU(), nn.Linear(hidden, out))
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)

        def forward(self, z: "torch.Tensor") -> "torch.Tensor":
            h = self.proj(z)
            return nn.functional.normalize(h + ALPHA * self.mlp(h), dim=-1)

    out = d_img if d_img == d_txt else min(shared_dim, d_img)
    log_tau = nn.Parameter(torch.tensor(float(np.log(TAU_INIT))))
    return Tower(d_img, out), Tower(d_txt, out), log_tau


def train_adapter(img: np.ndarray, labels: np.ndarray, text: np.ndarray, *, epochs: int = EPOCHS,
                  batch_size: int = 512, lr: float = 1e-3, weight_decay: float = 1e-2,
                  shared_dim: int = SHARED_DIM, seed: int = 0, device: str = "cpu"):
    """Train one adapter pair on ``(img, labels)`` against the ``C`` class prompts.

    Args:
        img: ``(n, D)`` float32 frozen image features.
        labels: ``(n,)`` ints in ``0..C-1`` (the training labels, noisy or not).
        text: ``(C, Dt)`` float32 frozen class-prompt features.
        epochs, batch_size, lr, weight_decay: AdamW minibatch training settings.
        shared_dim: width of the shared space when ``D != Dt`` (at most ``D``).
        seed: seed for the initialisation and the minibatch order.
        device: ``cpu`` or ``cuda``.

    Returns:
        ``apply(x) -> (u (m, S), t (C, S), tau)``: numpy function of the trained adapters.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the global RNG
        torch.manual_seed(seed)
        img_tower, txt_tower, log_tau = _build(img.shape[1], text.shape[1], shared_dim)
    dev = torch.device(device)
    img_tower, txt_tower = img_tower.to(dev), txt_tower.to(dev)
    log_tau = torch.nn.Parameter(log_tau.data.to(dev))
    params = [*img_tower.parameters(), *txt_tower.parameters(), log_tau]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    x = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).to(dev)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(dev)
    g = torch.from_numpy(np.ascontiguousarray(text, dtype=np.float32)).to(dev)
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=gen).to(dev).split(batch_size):
            logits = img_tower(x[batch]) @ txt_tower(g).T / log_tau.exp()
            loss = torch.nn.functional.cross_entropy(logits, y[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                log_tau.clamp_(np.log(0.01), np.log(1.0))  # keep the temperature in a sane range

    def apply(z: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        with torch.inference_mode():
            zt = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32)).to(dev)
            u = torch.cat([img_tower(b) for b in zt.split(8192)]) if len(zt) else img_tower(zt)
            return u.cpu().numpy(), txt_tower(g).cpu().numpy(), float(log_tau.exp())

    return apply


def crossfit_adapters(img: np.ndarray, labels: np.ndarray, text: np.ndarray, *, folds: int = 5,
                      seed: int = 0, epochs: int = EPOCHS, progress: bool = False, device: str = "cpu",
                      fold: np.ndarray | None = None, train_mask: np.ndarray | None = None, **train_kw) -> CrossFit:
    """Cross-fitted adapters: each fold is embedded and scored by adapters trained on the others.

    Args:
        img: ``(N, D)`` float32 frozen image features (L2-normalised).
        labels: ``(N,)`` ints in ``0..C-1``.
        text: ``(C, Dt)`` float32 frozen class-prompt features.
        folds: number of folds (>= 2).
        seed: seed of the folds and of each fold's training (``seed + fold``).
        epochs: training epochs per fold.
        progress: show a tqdm bar over the folds.
        device: ``cpu`` or ``cuda``.
        fold: ``(N,)`` ints in ``0..folds-1`` to use instead of :func:`stratified_folds` (labels, seed).
        train_mask: ``(N,)`` bool; only these samples train the adapters (trimming), every sample is
            still scored by its fold's adapter. None: all train. Either way at most
            :data:`MAX_TRAIN_ROWS` of them (seeded subsample) train each fold's adapter.
        **train_kw: passed to :func:`train_adapter` (``batch_size``, ``lr``, ``weight_decay``, ``shared_dim``).

    Returns:
        A :class:`CrossFit` with out-of-fold outputs for every sample.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if len(img) != len(labels):
        raise DdsError(f"got {len(img)} image features but {len(labels)} labels")
    if fold is None:
        fold = stratified_folds(labels, folds, seed)
    elif fold.shape != labels.shape or fold.min() < 0 or fold.max() >= folds:
        raise DdsError(f"fold must be ({len(labels)},) ints in 0..{folds - 1}")
    if train_mask is not None and np.shape(train_mask) != labels.shape:
        raise DdsError(f"train_mask must be ({len(labels)},) bools")
    u = None
    texts, taus = [], []
    bar = range(folds)
    if progress:
        bar = tqdm(bar, desc="adapters", unit="fold")
    for f in bar:
        held = fold == f
        train = np.flatnonzero(~held if train_mask is None else ~held & train_mask)
        if len(train) > MAX_TRAIN_ROWS:  # a seeded subsample: the adapter's cost stops growing with N
            train = np.sort(np.random.default_rng(seed + f).choice(train, MAX_TRAIN_ROWS, replace=False))
        apply = train_adapter(img[train], labels[train], text, epochs=epochs, seed=seed + f, device=device,
                              **train_kw)
        rows = np.flatnonzero(held)
        for start in range(0, max(1, len(rows)), APPLY_ROWS):  # in chunks: no full copy of the fold's rows
            part = rows[start:start + APPLY_ROWS]
            u_f, t_f, tau = apply(img[part])
            if u is None:
                u = np.zeros((len(img), u_f.shape[1]), np.float32)
            u[part] = u_f
        texts.append(t_f)
        taus.append(tau)
    return CrossFit(u=u, text=np.stack(texts), fold=fold, tau=np.array(taus))


def zero_shot(img: np.ndarray, text: np.ndarray, *, tau: float = ZERO_SHOT_TAU) -> ClassScores:
    """Class cosines and probabilities of an aligned encoder without adapters (computed on demand).

    Args:
        img: ``(N, D)`` float32 L2-normalised image embeddings (referenced, not copied).
        text: ``(C, D)`` float32 L2-normalised class embeddings in the same space.
        tau: softmax temperature.

    Returns:
        A :class:`ClassScores` with one group.
    """
    if img.shape[1] != text.shape[1]:
        raise DdsError(
            f"image ({img.shape[1]}-d) and text ({text.shape[1]}-d) embeddings live in different spaces; "
            "zero-shot scores need an aligned encoder: use --adapters on"
        )
    return ClassScores(emb=img, text=np.asarray(text, np.float32)[None], group=np.zeros(len(img), np.int64),
                       tau=np.array([tau]))
