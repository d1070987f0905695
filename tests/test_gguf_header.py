"""The GGUF header reader against gguf's GGUFReader (the reference) on the same files."""
import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from conftest import write_gguf
from megactx.loader.gguf_header import read_header


def plain(value):
    """numpy arrays (numbers) as lists, as GGUFReader's contents() gives them."""
    return value.tolist() if isinstance(value, np.ndarray) else [plain(v) for v in value] \
        if isinstance(value, list) else value


def assert_same_as_reference(path: str) -> None:
    ref = gguf.GGUFReader(path)
    got = read_header(path)
    raw = open(path, "rb").read()
    keys = [k for k in ref.fields if not k.startswith("GGUF.")]
    assert list(got.fields) == keys
    for key in keys:
        value = got.fields[key]
        value = plain(value)
        if value and isinstance(value, list) and isinstance(value[0], list):  # GGUFReader flattens nested arrays
            value = [x for inner in value for x in inner]
        assert value == ref.fields[key].contents(), key
        start, end = got.spans[key]  # the entry's bytes: what the tokenizer cache key hashes
        assert raw[start:end] == b"".join(part.tobytes() for part in ref.fields[key].parts), key
    assert [t.name for t in got.tensors] == [t.name for t in ref.tensors]
    for mine, theirs in zip(got.tensors, ref.tensors):
        assert mine.tensor_type == theirs.tensor_type and mine.shape == tuple(theirs.shape.tolist())
        assert mine.data.dtype == theirs.data.dtype and mine.data.shape == theirs.data.shape, mine.name
        assert np.array_equal(np.asarray(mine.data).view(np.uint8), np.asarray(theirs.data).view(np.uint8))


def test_the_bundled_model_reads_as_gguf_reads_it(smollm2_path):
    assert_same_as_reference(smollm2_path)


def test_a_written_checkpoint_reads_as_gguf_reads_it(tiny_dir, tmp_path):
    # Q5_0 here, the bundled model's Q4_1 and F32 above, F32 and F16 below: block and plain types
    assert_same_as_reference(write_gguf(str(tmp_path / "m.gguf"), tiny_dir("qwen2"), "qwen2", Q.Q5_0))


def test_every_value_type_nested_arrays_and_a_custom_alignment(tmp_path):
    path = str(tmp_path / "kinds.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_custom_alignment(64)
    for i, (name, kind) in enumerate([("u8", gguf.GGUFValueType.UINT8), ("i8", gguf.GGUFValueType.INT8),
                                      ("u16", gguf.GGUFValueType.UINT16), ("i16", gguf.GGUFValueType.INT16),
                                      ("u32", gguf.GGUFValueType.UINT32), ("i32", gguf.GGUFValueType.INT32),
                                      ("u64", gguf.GGUFValueType.UINT64), ("i64", gguf.GGUFValueType.INT64),
                                      ("f32", gguf.GGUFValueType.FLOAT32), ("f64", gguf.GGUFValueType.FLOAT64)]):
        w.add_key_value(f"test.{name}", i + 1, kind)
    w.add_bool("test.flag", True)
    w.add_string("test.text", "déjà vu")
    w.add_array("test.ints", [3, -1, 4])
    w.add_array("test.floats", [0.5, 1.5])
    w.add_array("test.words", ["a", "", "ünï"])
    w.add_array("test.nested", [[1, 2], [3]])
    w.add_tensor("odd", np.arange(5, dtype=np.float32))
    w.add_tensor("after", np.ones((3, 4), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_same_as_reference(path)
    header = read_header(path)
    assert header.fields["general.alignment"] == 64 and header.fields["test.nested"][0].tolist() == [1, 2]
    assert header.tensors[1].data.tolist() == [[1.0] * 4] * 3


def test_a_cut_or_foreign_file_is_a_value_error(smollm2_path, tmp_path):
    data = open(smollm2_path, "rb").read()
    header_end = min(t.offset for t in read_header(smollm2_path).tensors)
    for name, content, message in [("mid_header.gguf", data[:header_end // 2], "the header ends early"),
                                   ("mid_tensors.gguf", data[:header_end + 1000], "runs past the end of the file"),
                                   ("other.bin", b"PK\x03\x04" + data[4:1000], "magic")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=message):
            read_header(str(tmp_path / name))
