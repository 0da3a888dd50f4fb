"""Few-shot prompts and predictions, example selection (random / semantic / diverse / MMR), k-means."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import GPTConfig
from jaxllm.model import GPT
from jaxllm.prompting import ExampleSelector, FewShotLearner, kmeans, select_examples
from jaxllm.sampling import generate_text
from jaxllm.tokenizer import CharTokenizer

TASK = "Give each word its colour."
EXAMPLES = [("apple", "red"), ("sky", "blue")]


def test_prompt_layout_is_exact():
    prompt = FewShotLearner.create_few_shot_prompt(TASK, EXAMPLES, "grass")
    assert prompt == ("Give each word its colour.\n\n"
                      "Example 1:\nInput: apple\nOutput: red\n\n"
                      "Example 2:\nInput: sky\nOutput: blue\n\n"
                      "Now solve:\nInput: grass\nOutput:")
    assert FewShotLearner.create_few_shot_prompt("T", [], "q") == "T\n\nNow solve:\nInput: q\nOutput:"
    # dicts with input/output keys are the same examples
    assert prompt == FewShotLearner.create_few_shot_prompt(
        TASK, [{"input": "apple", "output": "red"}, {"input": "sky", "output": "blue"}], "grass")


@pytest.mark.parametrize("bad, match", [
    ([("apple", "red", "x")], r"examples\[0\].*not an \(input, output\) pair"),
    (["apple"], r"examples\[0\]"),
    ([("apple", 3)], r"examples\[0\]"),
    ([{"in": "apple", "out": "red"}], r"examples\[0\] is a dict without 'input' and 'output'"),
    ("apple red", "must be a list of"),
])
def test_bad_examples(bad, match):
    with pytest.raises(ValueError, match=match):
        FewShotLearner.create_few_shot_prompt(TASK, bad, "q")


@pytest.fixture(scope="module")
def learner():
    text = TASK + "\n:" + "abcdefghijklmnopqrstuvwxyzEINOS0123456789 "
    tok = CharTokenizer.from_text(text)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=256, n_layer=2, n_head=2, n_embd=32)
    return FewShotLearner(GPT(cfg, rngs=nnx.Rngs(3)), tok, max_new_tokens=12)


def test_batched_prediction_equals_one_by_one(learner):
    queries = ["grass", "sea", "a", "strawberry"]
    per_query = [EXAMPLES, EXAMPLES[:1], [], [("sun", "gold"), ("night", "black"), ("snow", "white")]]
    batched = learner.predict_batch(TASK, per_query, queries)       # ragged prompts, left-padded
    alone = [learner.predict(TASK, ex, q) for ex, q in zip(per_query, queries)]
    assert batched == alone
    shared = learner.predict_batch(TASK, EXAMPLES, queries)
    assert shared == [learner.predict(TASK, EXAMPLES, q) for q in queries]
    assert all("\n" not in p and p == p.strip() for p in batched + shared)


@dataclasses.dataclass(frozen=True)
class _ThenNewline:
    """Steers greedy decoding: `first` until it has been written, then a newline."""
    first: int
    newline: int
    needs_seen = True

    def __call__(self, logits_BV, seen_BV):
        written = seen_BV[:, self.first]
        return logits_BV.at[:, self.first].add(jnp.where(written, 0.0, 100.0)).at[:, self.newline].add(
            jnp.where(written, 100.0, 0.0))


def test_answer_is_the_first_line_of_the_greedy_continuation(learner):
    tok = learner.tokenizer
    queries = ("grass", "sea")
    prompts = [learner.create_few_shot_prompt(TASK, EXAMPLES, q) for q in queries]
    assert not any("9" in p for p in prompts)
    steer = _ThenNewline(tok.encode("9")[0], tok.encode("\n")[0])
    free = generate_text(learner.model, tok, prompts, 12, temperature=0.0, logits_processors=(steer,))
    assert all(f.startswith("9\n") for f in free)        # no stop string: it goes on past the newline
    assert learner.predict_batch(TASK, EXAMPLES, list(queries), max_new_tokens=12,
                                 logits_processors=(steer,)) == ["9", "9"]


def test_batch_bad_input(learner):
    with pytest.raises(ValueError, match="2 lists for 3 queries"):
        learner.predict_batch(TASK, [EXAMPLES, EXAMPLES], ["a", "b", "c"])
    with pytest.raises(ValueError, match="use predict"):
        learner.predict_batch(TASK, EXAMPLES, "grass")
    with pytest.raises(ValueError, match="exceeds the model.s block_size 256"):
        learner.predict(TASK, EXAMPLES * 4, "grass")
    with pytest.raises(ValueError, match="exceeds the model.s block_size 256"):
        learner.predict_consistent(TASK, EXAMPLES * 4, "grass")
    assert learner.predict_batch(TASK, EXAMPLES, []) == []


def test_self_consistency(learner):
    res = learner.predict_consistent(TASK, EXAMPLES, "grass", n=6, temperature=1.0)
    assert len(res.samples) == 6 and len(res.answers) == 6
    assert all(a is None or "\n" not in a for a in res.answers)
    if res.answer is not None:
        assert res.votes[res.answer] == max(res.votes.values())
        assert res.vote_share == res.votes[res.answer] / 6


# --------------------------------------------------------------------------- selection


class FakeEncoder:
    """Fixed vectors per text (normalised), counting how many texts it was asked to embed."""

    def __init__(self, vectors: dict[str, np.ndarray]):
        self.vectors = {t: np.asarray(v, np.float32) / np.linalg.norm(v) for t, v in vectors.items()}
        self.calls = []

    def encode(self, texts):
        self.calls.append(len(texts))
        return np.stack([self.vectors[t] for t in texts])


@pytest.fixture
def pool_and_encoder():
    rng = np.random.default_rng(0)
    vecs = {f"w{i}": rng.normal(size=16) for i in range(40)}
    vecs["query"] = rng.normal(size=16)
    pool = [(f"w{i}", f"out{i}") for i in range(40)]
    return pool, FakeEncoder(vecs)


def test_semantic_is_the_true_nearest_and_pool_is_embedded_once(pool_and_encoder):
    pool, enc = pool_and_encoder
    selector = ExampleSelector(pool, enc)
    q = enc.vectors["query"]
    brute = np.argsort([-(enc.vectors[x] @ q) for x, _ in pool])[:5]
    assert selector.select_indices("query", 5, "semantic") == brute.tolist()
    for _ in range(4):
        selector.select("query", 3, "semantic")
        selector.select("query", 3, "mmr")
    assert enc.calls.count(40) == 1 and enc.calls.count(1) == 9     # the pool once, the query per call


def test_semantic_with_minilm():
    pool = [("The capital of Vorland is Kessa.", "Kessa"), ("Bread is baked in an oven.", "oven"),
            ("Otters live near rivers.", "rivers"), ("The piano has 88 keys.", "88"),
            ("Kessa is the largest city of Vorland.", "Kessa")]
    picked = select_examples(pool, "What is Vorland's capital city?", 2, "semantic")
    assert {p[1] for p in picked} == {"Kessa"}


def test_mmr_trades_relevance_for_variety():
    enc = FakeEncoder({"q": [1, 0, 0], "a": [0.95, 0.3, 0], "a2": [0.95, 0.3, 0.001], "b": [0.8, -0.6, 0],
                       "c": [0, 0, 1]})
    selector = ExampleSelector([(t, t) for t in ("a", "a2", "b", "c")], enc)
    assert selector.select_indices("q", 2, "semantic") == [0, 1]            # the near-duplicates
    assert selector.select_indices("q", 2, "mmr", lambda_=0.5) == [0, 2]    # one of them, then b
    assert selector.select_indices("q", 3, "mmr", lambda_=1.0) == selector.select_indices("q", 3, "semantic")


def test_diverse_takes_one_example_per_cluster():
    rng = np.random.default_rng(1)
    centres = np.eye(8)[:3] * 10
    vecs, pool = {}, []
    for c in range(3):
        for j in range(6):
            vecs[f"c{c}-{j}"] = centres[c] + rng.normal(scale=0.3, size=8)
            pool.append((f"c{c}-{j}", str(c)))
    selector = ExampleSelector(pool, FakeEncoder(vecs))
    picked = selector.select("anything", 3, "diverse")
    assert sorted(p[1] for p in picked) == ["0", "1", "2"]
    assert selector.select("other query", 3, "diverse") == picked       # cached: the query is not used


def test_random_is_seeded_and_distinct(pool_and_encoder):
    pool, enc = pool_and_encoder
    selector = ExampleSelector(pool, enc)
    a = selector.select("query", 10, "random", seed=4)
    assert a == selector.select("query", 10, "random", seed=4) != selector.select("query", 10, "random", seed=5)
    assert len(set(a)) == 10 and enc.calls == []          # random needs no embeddings


def test_selection_bad_input(pool_and_encoder):
    pool, enc = pool_and_encoder
    with pytest.raises(ValueError, match="pool is empty"):
        ExampleSelector([], enc)
    selector = ExampleSelector(pool, enc)
    with pytest.raises(ValueError, match="n=41 is more examples than the pool holds \\(40\\)"):
        selector.select("query", 41, "semantic")
    with pytest.raises(ValueError, match="unknown selection method 'nearest'.*random, semantic, diverse, mmr"):
        selector.select("query", 2, "nearest")
    with pytest.raises(ValueError, match=r"pool\[1\]"):
        ExampleSelector([("a", "b"), "c"], enc)
    with pytest.raises(ValueError, match="embeddings must be \\(40, dim\\)"):
        ExampleSelector(pool, enc, embeddings=np.zeros((3, 16)))
    assert selector.select("query", 0, "semantic") == []


@pytest.mark.parametrize("data", ["blobs", "gaussian"])
def test_kmeans_inertia_matches_scikit_learn(data):
    cluster = pytest.importorskip("sklearn.cluster")
    rng = np.random.default_rng(0)
    if data == "blobs":
        centres = rng.normal(scale=6, size=(6, 10))
        x = np.concatenate([c + rng.normal(size=(80, 10)) for c in centres])
    else:   # no real clusters: many local minima
        x = rng.normal(size=(500, 8))
    x = x.astype(np.float32)
    ours = kmeans(x, 6, seed=0, n_init=4)
    ref = cluster.KMeans(6, n_init=4, random_state=0).fit(x)
    print(f"{data}: inertia jaxllm {ours.inertia:.2f}, scikit-learn {ref.inertia_:.2f}")
    assert abs(ours.inertia - ref.inertia_) <= 0.01 * ref.inertia_
    # the inertia is what the labels and centres say
    assert np.isclose(ours.inertia, ((x - ours.centres[ours.labels]) ** 2).sum(), rtol=1e-4)


def test_kmeans_bad_input():
    with pytest.raises(ValueError, match="k=5 must be between 1 and the number of points \\(3\\)"):
        kmeans(np.zeros((3, 2)), 5)
    with pytest.raises(ValueError, match="non-empty \\(N, D\\)"):
        kmeans(np.zeros((0, 2)), 1)
