"""The `parti` Python model against the python_backend contract, with a stand-in `pb_utils`.

Triton's `triton_python_backend_utils` exists only inside the server's stub, so these tests
give the model a small module with the same names and load `model.py` from a version
folder exactly as the server does; the server itself is exercised in test_serving.py.
"""

import importlib.util
import json
import sys
import types

import numpy as np
import pytest
from google.protobuf.json_format import MessageToDict

from parti_ops.deploy.triton import add_version, read_config, set_served_version


class _Tensor:
    def __init__(self, name, array):
        self.name, self.array = name, np.asarray(array)

    def as_numpy(self):
        return self.array


class _Error:
    CANCELLED = "CANCELLED"

    def __init__(self, message, code=None):
        self.message, self.code = message, code


class _Response:
    def __init__(self, output_tensors=(), error=None):
        self.outputs = {t.name: t.array for t in output_tensors}
        self.error = error


class _Request:
    def __init__(self, cancelled=False, **inputs):
        self.inputs, self.cancelled = inputs, cancelled

    def is_cancelled(self):
        return self.cancelled


def _stand_in() -> types.ModuleType:
    module = types.ModuleType("triton_python_backend_utils")
    module.Tensor, module.TritonError, module.InferenceResponse = _Tensor, _Error, _Response
    module.Logger = types.SimpleNamespace(log_info=lambda m: None, log_error=lambda m: None)

    def get_input_tensor_by_name(request, name):
        value = request.inputs.get(name)
        return None if value is None else _Tensor(name, value)

    module.get_input_tensor_by_name = get_input_tensor_by_name
    return module


@pytest.fixture(scope="module")
def model(exported, deploy_config, tmp_path_factory):
    repo = tmp_path_factory.mktemp("contract") / "repository"
    folder = add_version(repo, exported["dir"], 1, deploy_config.serve)
    config = read_config(set_served_version(repo, deploy_config.serve, 1))
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "triton_python_backend_utils", _stand_in())
        patch.syspath_prepend(str(folder))
        spec = importlib.util.spec_from_file_location("parti_version_model", folder / "model.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        instance = module.TritonPythonModel()
        instance.initialize(
            {
                "model_config": json.dumps(MessageToDict(config, preserving_proto_field_name=True)),
                "model_repository": str(repo / "parti"),
                "model_version": "1",
            }
        )
        yield instance


def _prompts(*texts: bytes) -> np.ndarray:
    return np.array([[t] for t in texts], dtype=object)


def test_one_response_per_request_and_bad_ones_fail_alone(model, exported):
    requests = [
        _Request(prompt=_prompts(b"a red circle", b"a blue star"), seed=np.array([[4], [5]])),
        _Request(prompt=_prompts(b"\xff")),
        _Request(seed=np.array([[1]])),
        _Request(prompt=_prompts(b"a green square"), top_p=np.array([[2.0]], np.float32)),
        _Request(prompt=_prompts(b"a green square"), temperature=np.array([[0.0]], np.float32)),
    ]
    responses = model.execute(requests)
    assert len(responses) == len(requests)
    good = responses[0]
    assert good.error is None
    size = model.model.meta["image_size"]
    assert good.outputs["image"].shape == (2, size, size, 3)
    assert good.outputs["image"].dtype == np.uint8
    assert good.outputs["tokens"].shape == (2, model.model.image_length)
    assert good.outputs["tokens"].dtype == np.int32
    assert "not UTF-8" in responses[1].error.message
    assert "missing input 'prompt'" in responses[2].error.message
    assert "top_p=2.0" in responses[3].error.message
    assert responses[4].error is None and responses[4].outputs["image"].shape[0] == 1
    # Batched with others, a request gets what it would get alone.
    alone = model.execute([_Request(prompt=_prompts(b"a red circle", b"a blue star"),
                                    seed=np.array([[4], [5]]))])[0]  # fmt: skip
    assert np.array_equal(alone.outputs["image"], good.outputs["image"])


def test_a_cancelled_request_gets_a_cancelled_error_and_the_rest_are_served(model):
    requests = [
        _Request(prompt=_prompts(b"a red circle")),
        _Request(prompt=_prompts(b"a blue star", b"a green cross"), cancelled=True),
    ]
    responses = model.execute(requests)
    assert responses[0].error is None and responses[0].outputs["image"].shape[0] == 1
    assert responses[1].error.code == _Error.CANCELLED
    assert "cancelled" in responses[1].error.message
