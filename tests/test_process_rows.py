"""Each process of a multi-process run builds only its own rows of the global batch: the batch
functions asked for some rows give exactly those rows of the whole batch (so results do not depend
on how many processes share a run), and the rows a process's devices hold are found from the mesh.
The two-process runs themselves are tests/test_multihost.py."""

import jax
import numpy as np
import pytest

from jaxllm import parallel
from jaxllm.alignment.pairs import PairBatch, rows_batch_fn
from jaxllm.data import TokenDataset, prepare
from jaxllm.data.packing import Rows
from jaxllm.stages.corpus import corpus_batches
from jaxllm.training.loop import LoopConfig, _check_rows, takes_rows

from helpers import run_main

# a whole batch of 8 rows split two ways and four ways, in runs of rows and scattered
ROW_SETS = [slice(0, 4), slice(4, 8), slice(2, 4), np.array([0, 1, 6, 7]), np.array([5])]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    (root / "text.txt").write_text("".join(rng.choice(list("abcdefgh \n"), 3000)))
    return TokenDataset(prepare(str(root / "text.txt"), root / "data", tokenizer="char"))


def _part(tree, rows):
    """The rows `rows` (axis 1) of every leaf of a whole batch."""
    return jax.tree.map(lambda a: a[:, rows], tree)


def _assert_same(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("rows", ROW_SETS, ids=str)
def test_sampler_rows_equal_those_rows_of_the_whole_batch(corpus, rows):
    for seed, step in ((0, 0), (1337, 41)):
        x, y = corpus.sample_batch("train", seed, step, 8, 16)
        px, py = corpus.sample_batch("train", seed, step, 8, 16, rows=rows)
        assert px.shape == (len(range(8)[rows]) if isinstance(rows, slice) else len(rows), 16)
        np.testing.assert_array_equal(px, x[rows])
        np.testing.assert_array_equal(py, y[rows])
        np.testing.assert_array_equal(px[:, 1:], py[:, :-1])   # still next-token windows


@pytest.mark.parametrize("rows", ROW_SETS, ids=str)
def test_pretraining_batch_rows_equal_those_rows_of_every_micro_batch(corpus, rows):
    batch_fn = corpus_batches(corpus, LoopConfig(batch_size=8, grad_accum=3, seed=5), 16)
    assert takes_rows(batch_fn)
    whole = batch_fn(7)
    # unchanged for one process: the whole batch is the sampler's 24 windows, 8 per micro-batch
    x, y = corpus.sample_batch("train", 5, 7, 24, 16)
    _assert_same(whole, (x.reshape(3, 8, 16), y.reshape(3, 8, 16)))
    _assert_same(batch_fn(7, rows=rows), _part(whole, rows))


def _sft_rows(n=20, T=6):
    rng = np.random.default_rng(1)
    return Rows(*(rng.integers(0, 50, (n, T)).astype(np.int32) for _ in range(4)))


@pytest.mark.parametrize("rows", ROW_SETS, ids=str)
def test_sft_batch_rows_equal_those_rows_of_the_whole_batch(rows):
    data = _sft_rows()
    batch_fn = rows_batch_fn(data, seed=3, batch_size=8, accum=2)
    assert takes_rows(batch_fn)
    whole = batch_fn(11)
    idx = np.random.default_rng([3, 11]).integers(0, 20, 16)   # the draw one process has always made
    _assert_same(whole, Rows(*(a[idx].reshape(2, 8, -1) for a in data)))
    _assert_same(batch_fn(11, rows=rows), _part(whole, rows))


@pytest.mark.parametrize("rows", ROW_SETS, ids=str)
def test_preference_pair_rows_equal_those_rows_of_the_whole_batch(rows):
    side = _sft_rows()
    rng = np.random.default_rng(2)
    data = PairBatch(side, side._replace(tokens=side.tokens + 1), *(rng.random(20).astype(np.float32) for _ in range(4)))
    batch_fn = rows_batch_fn(data, seed=4, batch_size=8, accum=2)
    assert takes_rows(batch_fn)
    whole = batch_fn(2)
    idx = np.random.default_rng([4, 2]).integers(0, 20, 16)
    _assert_same(whole, jax.tree.map(lambda a: a[idx].reshape(2, 8, *a.shape[1:]), data))
    _assert_same(batch_fn(2, rows=rows), _part(whole, rows))


def test_a_batch_function_without_rows_is_built_whole():
    assert not takes_rows(lambda step: None)
    assert not takes_rows(lambda step, **kwargs: None)   # might ignore `rows`: not trusted with it
    assert takes_rows(lambda step, rows=None: None)


def test_a_batch_function_that_ignores_its_rows_is_an_error_naming_them():
    whole = (np.zeros((1, 8, 16), np.int32),) * 2
    assert _check_rows(_part(whole, slice(0, 4)), slice(0, 4), 8) is not None
    with pytest.raises(ValueError, match=r"rows=slice\(0, 4, None\)\) returned batches with \[8, 8\] rows on "
                                         r"axis 1, not the 4 rows asked for \(of 8\)"):
        _check_rows(whole, slice(0, 4), 8)


@pytest.mark.skipif(len(jax.devices()) != 8, reason="tests/conftest.py forces 8 CPU devices")
def test_the_rows_a_process_holds_follow_its_devices_on_the_mesh():
    # one process holds every row
    mesh = parallel.make_mesh("data:2,fsdp:4")
    assert parallel.process_batch_rows(mesh, 16) == slice(0, 16)
    assert parallel.process_batch_rows(parallel.make_mesh("tensor:8"), 16) == slice(0, 16)

    # a process's devices, as a second process would see them: the rows of those devices
    sharding = parallel.batch_sharding(mesh, 1)
    def held(devices, shape=(2, 16)):
        return parallel._rows_of_devices(sharding, shape, 1, list(devices))
    assert held(mesh.devices[0].ravel()) == slice(0, 8)            # data 0: the first half
    assert held(mesh.devices[1, 2:].ravel()) == slice(12, 16)      # data 1, fsdp 2-3: the last quarter
    # devices whose rows are not one run: their blocks in order (what make_array_from_process_local_data expects)
    np.testing.assert_array_equal(held(mesh.devices[:, 0].ravel()), [0, 1, 8, 9])
    # tensor devices hold the same rows: counted once
    tmesh = parallel.make_mesh("data:2,tensor:4")
    tsharding = parallel.batch_sharding(tmesh, 0)
    assert parallel._rows_of_devices(tsharding, (8,), 0, list(tmesh.devices[1].ravel())) == slice(4, 8)
    assert parallel.row_count(slice(12, 16), 16) == 4 and parallel.row_count(np.array([0, 1, 8, 9]), 16) == 4


@pytest.mark.skipif(len(jax.devices()) != 8, reason="tests/conftest.py forces 8 CPU devices")
def test_shard_batch_of_a_process_rows_places_them_like_the_whole_batch():
    mesh = parallel.make_mesh("data:2,fsdp:4")
    whole = (np.arange(2 * 8 * 3).reshape(2, 8, 3), np.float32(0.5))   # rows, and a per-batch scalar
    mine = parallel.process_batch_rows(mesh, 8)
    placed = parallel.shard_batch((whole[0][:, mine], whole[1]), mesh, 1, global_rows=8)
    reference = parallel.shard_batch(whole, mesh, 1)
    for a, b in zip(placed, reference):
        assert a.shape == b.shape and a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_cli_joins_a_multi_process_run_only_when_asked_and_names_bad_settings(monkeypatch):
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    rc, out, err = run_main(["pretrain", "train.max_iters=1"])
    assert rc == 2 and "jaxllm pretrain: error: JAX_NUM_PROCESSES='two' is not an integer" in err
    # a command that does not train runs alone, whatever the environment says
    rc, out, err = run_main(["sample", "--ckpt", "/nonexistent-run"])
    assert rc == 2 and "JAX_NUM_PROCESSES" not in err
