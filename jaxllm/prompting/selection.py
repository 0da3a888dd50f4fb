"""Choosing the in-context examples: random, semantic (nearest), diverse (k-means) and MMR.

``ExampleSelector(pool, encoder)`` holds a pool of (input, output) examples and embeds their inputs
ONCE, on first need, with a sentence encoder (jaxllm's MiniLM, ``jaxllm.embeddings``; loaded on
first need when not given); every query after that costs one query embedding and a matmul.
``select_examples(pool, query, n, method)`` is the one-call form (pass an ExampleSelector as the
pool to reuse its embeddings across queries).

Methods (``n`` examples, returned in the order chosen):

- ``random``: n distinct examples, uniformly (seeded: ``seed``).
- ``semantic``: the n inputs with the highest cosine similarity to the query, most similar first.
- ``diverse``: k-means with k = n over the pool's embeddings (``kmeans``: jitted JAX, k-means++
  start), then the example nearest each centre: spread over the pool, the query is not used.
- ``mmr``: maximal marginal relevance (Carbonell & Goldstein, 1998): greedily the example that
  maximises ``lambda_ * sim(query, x) - (1 - lambda_) * max sim(x, already chosen)``; lambda_ = 1
  is ``semantic``, lower values trade relevance for variety.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.prompting.few_shot import Example, as_examples

METHODS = ("random", "semantic", "diverse", "mmr")


# --------------------------------------------------------------------------- k-means


@dataclasses.dataclass
class KMeansResult:
    centres: np.ndarray      # (k, D)
    labels: np.ndarray       # (N,) index of each point's nearest centre
    inertia: float           # sum of squared distances of points to their nearest centre
    iterations: int          # Lloyd iterations of the best start


def _sq_dists(x_ND, c_KD):
    """Squared Euclidean distances (N, K), clipped at 0 (the expanded form can dip below by rounding)."""
    d = (x_ND * x_ND).sum(1)[:, None] - 2 * x_ND @ c_KD.T + (c_KD * c_KD).sum(1)[None, :]
    return jnp.maximum(d, 0.0)


def _kmeans_pp(x_ND, k: int, key):
    """k-means++ (Arthur & Vassilvitskii, 2007): each next centre drawn with probability proportional
    to its squared distance from the nearest centre chosen so far."""
    N = x_ND.shape[0]
    key, first = jax.random.split(key)
    centres = jnp.zeros((k, x_ND.shape[1]), x_ND.dtype).at[0].set(x_ND[jax.random.randint(first, (), 0, N)])
    d2 = _sq_dists(x_ND, centres[:1])[:, 0]

    def add(i, carry):
        centres, d2, key = carry
        key, sub = jax.random.split(key)
        # a point at distance 0 (already a centre) gets probability 0; if all are 0, any point will do
        logits = jnp.where(d2.sum() > 0, jnp.log(jnp.maximum(d2, 1e-38)), 0.0)
        idx = jax.random.categorical(sub, logits)
        centres = centres.at[i].set(x_ND[idx])
        return centres, jnp.minimum(d2, _sq_dists(x_ND, x_ND[idx][None])[:, 0]), key

    centres, _, _ = jax.lax.fori_loop(1, k, add, (centres, d2, key))
    return centres


@functools.partial(jax.jit, static_argnames=("k", "max_iter"))
def _kmeans_runs(x_ND, keys, *, k: int, max_iter: int, tol):
    """Lloyd's algorithm from one k-means++ start per key (vmapped); each stops when the centres move
    by at most `tol` in total squared distance."""
    def one(key):
        def body(state):
            centres, _, it = state
            labels = jnp.argmin(_sq_dists(x_ND, centres), axis=1)
            onehot = jax.nn.one_hot(labels, k, dtype=x_ND.dtype)                 # (N, K)
            counts = onehot.sum(0)
            means = (onehot.T @ x_ND) / jnp.maximum(counts, 1)[:, None]
            new = jnp.where(counts[:, None] > 0, means, centres)                 # an empty cluster keeps its centre
            return new, ((new - centres) ** 2).sum(), it + 1

        init = (_kmeans_pp(x_ND, k, key), jnp.asarray(jnp.inf, x_ND.dtype), 0)
        centres, _, it = jax.lax.while_loop(lambda s: (s[1] > tol) & (s[2] < max_iter), body, init)
        d = _sq_dists(x_ND, centres)
        return centres, jnp.argmin(d, axis=1), jnp.min(d, axis=1).sum(), it

    return jax.vmap(one)(keys)


def kmeans(x, k: int, *, seed: int = 0, n_init: int = 4, max_iter: int = 300, tol: float = 1e-4) -> KMeansResult:
    """k-means of the rows of `x` (N, D): the best (lowest inertia) of `n_init` k-means++ starts.

    `tol` is relative, as in scikit-learn: Lloyd stops when the centres' total squared movement is
    at most tol x the mean per-feature variance of `x`."""
    x = np.asarray(x, np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"kmeans needs a non-empty (N, D) array, got shape {x.shape}")
    if not 1 <= k <= len(x):
        raise ValueError(f"k={k} must be between 1 and the number of points ({len(x)})")
    keys = jax.random.split(jax.random.key(seed), n_init)
    centres, labels, inertia, iters = _kmeans_runs(jnp.asarray(x), keys, k=k, max_iter=max_iter,
                                                   tol=float(tol * x.var(axis=0).mean()))
    best = int(np.argmin(np.asarray(inertia)))
    return KMeansResult(np.asarray(centres[best]), np.asarray(labels[best]), float(inertia[best]), int(iters[best]))


# --------------------------------------------------------------------------- selection


class ExampleSelector:
    """A pool of (input, output) examples whose inputs are embedded once, for many queries."""

    def __init__(self, pool, encoder=None, *, embeddings=None):
        self.pool: list[Example] = as_examples(pool, "pool")
        if not self.pool:
            raise ValueError("the example pool is empty; give at least one (input, output) pair")
        self.encoder = encoder
        self._embeddings = None if embeddings is None else self._check(np.asarray(embeddings, np.float32))
        self._diverse: dict[tuple[int, int], list[int]] = {}

    def _check(self, emb):
        if emb.ndim != 2 or len(emb) != len(self.pool):
            raise ValueError(f"embeddings must be ({len(self.pool)}, dim), one row per pool example; got {emb.shape}")
        return emb

    def _encoder(self):
        if self.encoder is None:
            from jaxllm.embeddings import SentenceEncoder
            self.encoder = SentenceEncoder.load()
        return self.encoder

    @property
    def embeddings(self) -> np.ndarray:
        """(pool size, dim) unit vectors of the pool's inputs, computed on first use."""
        if self._embeddings is None:
            self._embeddings = self._check(self._encoder().encode([x for x, _ in self.pool]))
        return self._embeddings

    def _similarities(self, query: str) -> np.ndarray:
        if not isinstance(query, str):
            raise ValueError(f"the query must be a string, got {type(query).__name__}")
        return self.embeddings @ self._encoder().encode([query])[0]

    def select(self, query: str, n: int, method: str = "semantic", *, seed: int = 0,
               lambda_: float = 0.5) -> list[Example]:
        return [self.pool[i] for i in self.select_indices(query, n, method, seed=seed, lambda_=lambda_)]

    def select_indices(self, query: str, n: int, method: str = "semantic", *, seed: int = 0,
                       lambda_: float = 0.5) -> list[int]:
        if method not in METHODS:
            raise ValueError(f"unknown selection method {method!r}; valid methods: {', '.join(METHODS)}")
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n must be an integer >= 0, got {n!r}")
        if n > len(self.pool):
            raise ValueError(f"n={n} is more examples than the pool holds ({len(self.pool)}); lower n or "
                             f"add examples to the pool")
        if n == 0:
            return []
        if method == "random":
            return np.random.default_rng(seed).choice(len(self.pool), n, replace=False).tolist()
        if method == "diverse":
            return self._diverse_indices(n, seed)
        sims = self._similarities(query)
        if method == "semantic":
            return np.argsort(-sims, kind="stable")[:n].tolist()
        if not 0.0 <= lambda_ <= 1.0:
            raise ValueError(f"lambda_ must be in [0, 1], got {lambda_}")
        return self._mmr(sims, n, lambda_)

    def _mmr(self, sims: np.ndarray, n: int, lambda_: float) -> list[int]:
        emb = self.embeddings
        chosen: list[int] = []
        redundancy = np.full(len(sims), -np.inf)         # max similarity to anything chosen so far
        for _ in range(n):
            score = lambda_ * sims - (1 - lambda_) * np.where(np.isfinite(redundancy), redundancy, 0.0)
            score[chosen] = -np.inf
            best = int(np.argmax(score))
            chosen.append(best)
            redundancy = np.maximum(redundancy, emb @ emb[best])
        return chosen

    def _diverse_indices(self, n: int, seed: int) -> list[int]:
        if (n, seed) not in self._diverse:
            emb = self.embeddings
            result = kmeans(emb, n, seed=seed)
            d = ((emb[:, None, :] - result.centres[None]) ** 2).sum(-1)          # (pool, n)
            picked: list[int] = []
            for c in range(n):                     # nearest to each centre, each example at most once
                for i in np.argsort(d[:, c], kind="stable"):
                    if i not in picked:
                        picked.append(int(i))
                        break
            self._diverse[(n, seed)] = picked
        return list(self._diverse[(n, seed)])


def select_examples(pool, query: str, n: int, method: str = "semantic", *, encoder=None, seed: int = 0,
                    lambda_: float = 0.5) -> list[Example]:
    """`n` examples of `pool` (a list of (input, output) pairs, or an ExampleSelector to reuse its
    embeddings) for `query`, chosen by `method`: random | semantic | diverse | mmr."""
    selector = pool if isinstance(pool, ExampleSelector) else ExampleSelector(pool, encoder)
    return selector.select(query, n, method, seed=seed, lambda_=lambda_)


