"""greedy.search on a tiny random Llama: schema and JSON round trip, determinism, exact grid levels, better than
uniform, monotone allocations, weighted scores and the model state left as it was."""
import pytest
import torch

import calibrate
import greedy
import model
import thresholds

SEQ_LEN, N_TOKENS = 32, 96  # three chunks


def tiny_model() -> model.Transformer:
    torch.manual_seed(0)
    args = model.ModelArgs(vocab_size=256, dim=64, n_layer=2, n_head=4, n_local_heads=2, head_dim=16,
                           intermediate_size=128, block_size=128)
    m = model.Transformer(args).float().eval()
    model.to_column_major(m)
    return m


@pytest.fixture(scope="module")
def setup():
    m = tiny_model()
    ids = torch.randint(0, 256, (N_TOKENS,), generator=torch.Generator().manual_seed(1)).tolist()
    table, n_tokens, _ = calibrate.record(m, ids, SEQ_LEN, "magnitude", 10_000, "cpu", progress=False)
    result = greedy.search(m, ids, SEQ_LEN, table, calibrate.LEVELS, "magnitude", seed=0, progress=False)
    return m, ids, table, n_tokens, result


def param_counts(c: model.ModelArgs) -> torch.Tensor:
    """Written out from the config, independently of model.projection_sizes."""
    q, kv = c.n_head * c.head_dim, c.n_local_heads * c.head_dim
    ff = c.dim * c.intermediate_size
    return torch.tensor([q * c.dim, kv * c.dim, kv * c.dim, c.dim * q, ff, ff, ff], dtype=torch.float64)


def allocation(result: dict, layer: int) -> torch.Tensor:
    """(len(grid), 7) sparsities of one layer."""
    return torch.tensor([result["layers"][layer][p] for p in model.PROJECTIONS], dtype=torch.float64).T


def test_schema_and_round_trip(setup, tmp_path):
    m, _, table, n_tokens, result = setup
    assert result["levels"] == greedy.DEFAULT_GRID
    assert len(result["layers"]) == m.config.n_layer
    for layer in result["layers"]:
        assert list(layer) == list(model.PROJECTIONS)
        for values in layer.values():
            assert len(values) == len(result["levels"])
            assert all(type(v) is float and 0 <= v <= greedy.CAP for v in values)
    path = tmp_path / "thr.json"
    thresholds.save(path, m.config, calibrate.LEVELS, table, "test", n_tokens, "magnitude", result)
    cal = thresholds.load(path, m.config)  # validates the greedy section
    assert cal["greedy"]["levels"].tolist() == result["levels"]
    for l in range(m.config.n_layer):
        assert torch.equal(cal["greedy"]["table"][l].T, allocation(result, l))


def test_reproducible(setup):
    m, ids, table, _, result = setup
    again = greedy.search(m, ids, SEQ_LEN, table, calibrate.LEVELS, "magnitude", seed=0, progress=False)
    assert again == result


def test_grid_levels_exact(setup):
    m, _, _, _, result = setup
    counts = param_counts(m.config)
    for l in range(m.config.n_layer):
        weighted = allocation(result, l) @ counts / counts.sum()
        assert torch.allclose(weighted, torch.tensor(result["levels"], dtype=torch.float64), rtol=0, atol=1e-6)


def test_monotone(setup):
    m, _, _, _, result = setup
    for l in range(m.config.n_layer):
        a = allocation(result, l)
        assert (a[1:] >= a[:-1]).all()
        assert (a[0] == 0).all()


def test_beats_uniform(setup):
    """The point of the search: at a mid level, the block output error is no larger than the uniform one's."""
    m, ids, table, _, result = setup
    i = result["levels"].index(0.5)
    chunks = torch.tensor(ids).view(-1, SEQ_LEN)
    with greedy.search_mode(m, "magnitude"):
        xs = greedy.block_inputs(m, chunks)
        m.setup_caches(*chunks.shape)
        pos = greedy.query_positions(SEQ_LEN, chunks.shape[0], seed=0)
        for l in range(m.config.n_layer):
            error = greedy.BlockError(m, l, xs[l], table, calibrate.LEVELS, pos)
            uniform = error(torch.full((len(model.PROJECTIONS),), 0.5, dtype=torch.float64))
            best = error(allocation(result, l)[i])
            assert 0 < best <= uniform


def test_query_positions():
    pos = greedy.query_positions(32, 3, seed=0)
    assert (pos >= 8).all() and (pos[1:] > pos[:-1]).all()  # the first quarter skipped; sorted, distinct
    assert len(pos) == min(24, -(-greedy.EVAL_TOKENS // 3))
    assert greedy.query_positions(2, 1, seed=0).tolist() == [0, 1]  # too short to skip anything


def test_block_error_reuses_keys_and_values_only_when_k_and_v_match(setup):
    m, ids, table, _, _ = setup
    chunks = torch.tensor(ids).view(-1, SEQ_LEN)
    with greedy.search_mode(m, "magnitude"):
        xs = greedy.block_inputs(m, chunks)
        m.setup_caches(*chunks.shape)
        pos = greedy.query_positions(SEQ_LEN, chunks.shape[0], seed=0)
        a = torch.full((len(model.PROJECTIONS),), 0.3, dtype=torch.float64)
        b = a.clone()
        b[2] = 0.7  # only v differs
        error = greedy.BlockError(m, 0, xs[0], table, calibrate.LEVELS, pos)
        first = error(a)
        again = error(b)
        fresh = greedy.BlockError(m, 0, xs[0], table, calibrate.LEVELS, pos)(b)
        assert again == fresh and again != first


def test_projection_sparsities(setup, tmp_path):
    m, _, table, n_tokens, result = setup
    path = tmp_path / "thr.json"
    thresholds.save(path, m.config, calibrate.LEVELS, table, "test", n_tokens, "magnitude", result)
    cal = thresholds.load(path, m.config)
    for i, level in enumerate(result["levels"]):
        got = thresholds.projection_sparsities(cal, level, greedy=True)
        want = torch.stack([allocation(result, l)[i] for l in range(m.config.n_layer)])
        assert torch.allclose(got, want, rtol=0, atol=1e-9)


def test_weighted_scores_and_state_restored(setup, monkeypatch):
    m, ids, _, _, _ = setup
    table, _, _ = calibrate.record(m, ids, SEQ_LEN, "weighted", 10_000, "cpu", progress=False)
    m.set_sparse(decode=True, prefill=False)
    before = torch.rand(m.config.n_layer, len(model.PROJECTIONS))
    m.set_thresholds(before)
    m.setup_caches(1, 64)
    m.start_stats()  # drop counting must be off while searching, and back on after
    stats = m.layers[0].stats
    seen = []
    call = greedy.BlockError.__call__

    def spy(self, sparsities):
        ff = self.block.feed_forward
        seen.append(self.block.attention.qkv_scale is not None and ff.w2_scale is not None and self.block.stats is None)
        return call(self, sparsities)

    monkeypatch.setattr(greedy.BlockError, "__call__", spy)
    result = greedy.search(m, ids, SEQ_LEN, table, calibrate.LEVELS, "weighted", grid=[0.0, 0.25, 0.5],
                           progress=False)
    assert seen and all(seen)
    assert result["levels"] == [0.0, 0.25, 0.5]
    assert all((b.sparse_decode, b.sparse_prefill) == (True, False) for b in m.layers)
    assert torch.equal(torch.stack([b.thresholds for b in m.layers]), before)
    assert m.layers[0].attention.qkv_scale is None and m.layers[0].feed_forward.w2_scale is None
    assert (m.max_batch_size, m.max_seq_length) == (1, 64)
    assert m.layers[0].stats is stats
    m.pop_stats()
    m.set_sparse(decode=False, prefill=False)
    m.set_thresholds(torch.zeros_like(before))


@pytest.mark.parametrize("grid", [[0.0, 0.5, 0.995], [0.0], [0.05, 0.1], [0.0, 0.5, 0.5], []])
def test_bad_grid(setup, grid):
    """Above the cap, one level, not from 0, not increasing, empty: refused before the search, as the loader
    would refuse the file."""
    m, ids, table, _, _ = setup
    with pytest.raises(ValueError, match="greedy grid"):
        greedy.search(m, ids, SEQ_LEN, table, calibrate.LEVELS, "magnitude", grid=grid, progress=False)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_block_error_that_overflowed_is_an_error(bad):
    """Every comparison with NaN fails (and inf ties with inf): the search would raise q first and write a
    valid-looking allocation."""
    with pytest.raises(FloatingPointError, match="block error"):
        greedy.search_block(lambda s: bad, torch.ones(len(model.PROJECTIONS)), [0.0, 0.5])
