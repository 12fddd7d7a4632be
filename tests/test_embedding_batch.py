"""The embedder's NumPy view of a llama_batch: what llama_decode will read, token by token."""

from __future__ import annotations

import ctypes

import llama_cpp

from themis_pg.embedding import _BatchArrays


def test_a_group_fills_tokens_positions_and_one_sequence_id_each():
    batch = llama_cpp.llama_batch_init(16, 0, 1)
    fill = _BatchArrays(batch, 16)
    try:
        fill.load([[5, 6, 7], [8], [9, 10]])
        assert batch.n_tokens == 6
        assert [batch.token[i] for i in range(6)] == [5, 6, 7, 8, 9, 10]
        assert [batch.pos[i] for i in range(6)] == [0, 1, 2, 0, 0, 1]
        # read through the struct's own pointers, as llama.cpp does
        assert [batch.seq_id[i][0] for i in range(6)] == [0, 0, 0, 1, 2, 2]
        assert all(batch.n_seq_id[i] == 1 and batch.logits[i] for i in range(6))
        fill.load([[1, 2]])  # a smaller pass after a larger one
        assert batch.n_tokens == 2
        assert [batch.seq_id[i][0] for i in range(2)] == [0, 0]
        assert [batch.pos[i] for i in range(2)] == [0, 1]
    finally:
        fill.release()
        ptr = ctypes.cast(batch.seq_id, ctypes.POINTER(ctypes.c_size_t))
        assert all(ptr[i] != fill.seq.ctypes.data + 4 * i for i in range(16))  # originals back
        llama_cpp.llama_batch_free(batch)
