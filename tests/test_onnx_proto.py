"""runtime/onnx_proto.py against the `onnx` package: every message parses back equal to what onnx.helper /
numpy_helper build, and a graph of it runs in onnxruntime."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from flashlm.runtime import onnx_proto as proto


def _parse(cls, data: bytes):
    msg = cls()
    msg.ParseFromString(data)
    return msg


@pytest.mark.parametrize("arr", [np.arange(7, dtype=np.float32) - 3.5, np.array([[1, -2], [3, 2**40]], np.int64),
                                 np.zeros((2, 0, 3), np.float16), np.array(3.0, np.float32),
                                 np.arange(12, dtype=np.uint8).reshape(3, 4), np.array([True, False])])
def test_tensor_equals_numpy_helper(arr):
    assert _parse(TensorProto, proto.tensor("t", arr)) == numpy_helper.from_array(arr, "t")


def test_external_tensor():
    got = _parse(TensorProto, proto.external_tensor("w", np.uint8, [5, 3, 16], "w.bin", 0, 240))
    want = TensorProto(name="w", data_type=TensorProto.UINT8, dims=[5, 3, 16], data_location=TensorProto.EXTERNAL)
    for k, v in (("location", "w.bin"), ("offset", "0"), ("length", "240")):
        e = want.external_data.add()
        e.key, e.value = k, v
    assert got == want


def test_node_attributes_equal_make_node():
    attrs = dict(K=576, N=-3, bits=4, epsilon=1e-5, scale=0.125, perm=[0, 2, 1, 3], pads=[-1, 2], mode="constant",
                 alphas=[0.5, 2.0])
    got = _parse(onnx.NodeProto, proto.node("Op", ["a", "", "b"], ["y"], domain="com.microsoft", **attrs))
    assert got == helper.make_node("Op", ["a", "", "b"], ["y"], domain="com.microsoft", **attrs)
    assert _parse(onnx.NodeProto, proto.node("Add", ["a", "b"], ["c"], name="n1")) == \
        helper.make_node("Add", ["a", "b"], ["c"], name="n1")


def test_value_info_and_model_equal_helper():
    vi = proto.value_info("x", proto.FLOAT16, ["T", 64, "past"])
    assert _parse(onnx.ValueInfoProto, vi) == helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["T", 64, "past"])
    w = np.arange(8, dtype=np.float32).reshape(4, 2)
    data = proto.model([proto.node("MatMul", ["x", "w"], ["y"])], "g", [proto.value_info("x", proto.FLOAT, ["T", 4])],
                       [proto.value_info("y", proto.FLOAT, ["T", 2])], [proto.tensor("w", w)],
                       opsets=[("", 17), ("com.microsoft", 1)], ir_version=9)
    want = helper.make_model(
        helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", 2])],
                          [numpy_helper.from_array(w, "w")]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)], ir_version=9)
    got = _parse(onnx.ModelProto, data)
    want.ClearField("producer_name")
    assert got == want
    onnx.checker.check_model(got)
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    y = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ w, rtol=1e-6)


def test_unsupported_values_are_refused():
    with pytest.raises(ValueError, match="numpy dtype"):
        proto.tensor("t", np.array(["a"]))
    with pytest.raises(ValueError, match="attribute bad"):
        proto.node("Op", [], [], bad=object())
