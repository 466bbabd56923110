"""The bounded GGUF header reader: every count checked against the file before it is trusted, sizes in the
metadata against the tensors, one-line errors naming the file."""

import struct

import numpy as np
import pytest

from effideploy.errors import EffideployError
from effideploy.models.gguf_header import read_gguf_header

HIDDEN, FFN, VOCAB, BLOCKS = 8, 16, 12, 2


def write_gguf(path, *, blocks=BLOCKS, hidden=HIDDEN, ffn=FFN, tokens=VOCAB, tensor_blocks=BLOCKS):
    """A small llama-shaped GGUF: metadata sizes as given, tensors for ``tensor_blocks`` blocks."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(blocks)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_token_list([f"t{i}" for i in range(tokens)])
    writer.add_token_scores([0.0] * tokens)
    writer.add_tensor("token_embd.weight", np.zeros((VOCAB, HIDDEN), dtype=np.float32))
    for index in range(tensor_blocks):
        writer.add_tensor(f"blk.{index}.attn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        writer.add_tensor(f"blk.{index}.ffn_gate.weight", np.zeros((FFN, HIDDEN), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_valid_file_reads_its_metadata_and_tensor_shapes(tmp_path):
    metadata, tensors = read_gguf_header(write_gguf(tmp_path / "m.gguf"))
    assert metadata["general.architecture"] == "llama" and metadata["llama.block_count"] == BLOCKS
    assert len(metadata["tokenizer.ggml.tokens"]) == VOCAB
    assert tensors["token_embd.weight"][0] == [HIDDEN, VOCAB]  # GGUF lists dims innermost first
    assert tensors["blk.1.ffn_gate.weight"][0] == [HIDDEN, FFN]


def _broken(tmp_path, change):
    path = write_gguf(tmp_path / "m.gguf")
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(change(data)))
    return path


def _set_u32(data, key, value):
    at = data.index(key.encode()) + len(key) + 4  # after the key: its uint32 type tag, then the value
    data[at:at + 4] = struct.pack("<I", value)
    return data


CASES = {
    "garbage after the magic": (lambda d: d[:4] + struct.pack("<I", 3) + bytes(range(256)) * 2,
                                "it claims [0-9]+ metadata entries and [0-9]+ tensors, more than"),
    "wrong magic": (lambda d: b"GGML" + d[4:], "does not start with the GGUF magic"),
    "unknown version": (lambda d: d[:4] + struct.pack("<I", 7) + d[8:], "version 7 is not one of"),
    "shorter than a header": (lambda d: d[:10], "shorter than a GGUF header"),
    "truncated tensor data": (lambda d: d[:-40], "ends at byte .* \\(truncated\\)"),
    "string longer than the file": (lambda d: d[:24] + struct.pack("<Q", 2**40) + d[32:],
                                    "past the end of the file"),
    "block count beyond the tensors": (lambda d: _set_u32(d, "llama.block_count", 10**9),
                                       "llama.block_count is 1000000000, but the tensors hold 2 blocks"),
    "embedding length beyond the tensors": (lambda d: _set_u32(d, "llama.embedding_length", 10**9),
                                            "llama.embedding_length is 1000000000, but token_embd.weight has rows of 8"),
    "ffn length beyond the tensors": (lambda d: _set_u32(d, "llama.feed_forward_length", 10**9),
                                      "feed_forward_length is 1000000000, but blk.0.ffn_gate.weight has 16 rows"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_problem_is_one_line_naming_the_file(tmp_path, name):
    change, fragment = CASES[name]
    path = _broken(tmp_path, change)
    with pytest.raises(EffideployError, match=fragment) as info:
        read_gguf_header(path)
    assert str(info.value).startswith(f"{path} is not a valid GGUF file: ") and "\n" not in str(info.value)


def test_metadata_and_tensors_that_disagree_are_refused(tmp_path):
    with pytest.raises(EffideployError, match="the tokenizer has 5 tokens, but token_embd.weight has 12 rows"):
        read_gguf_header(write_gguf(tmp_path / "tokens.gguf", tokens=5))
    with pytest.raises(EffideployError, match="block_count is 3, but the tensors hold 2 blocks"):
        read_gguf_header(write_gguf(tmp_path / "blocks.gguf", blocks=3))
    with pytest.raises(EffideployError, match="block_count is 1, but the tensors hold 2 blocks"):
        read_gguf_header(write_gguf(tmp_path / "fewer.gguf", blocks=1))
