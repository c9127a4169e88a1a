"""The registered model's MLflow pyfunc, logged as "models from code".

MLflow runs this file when it loads a model version, so the registry holds source
text and the bundle's safetensors and JSON, never a pickled object
(https://mlflow.org/docs/latest/ml/model/models-from-code/). The bundle is the
artifact `bundle`; `model_config["sample"]` holds the sampling defaults the model
was registered with, and each request may override them through `params`.

    model = mlflow.pyfunc.load_model("models:/parti@champion")
    images = model.predict(["a red circle on the left"], params={"seed": 3})  # (1, H, W, 3) uint8
"""

from typing import Any

import numpy as np
import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

PROMPT = "prompt"  # the input column


def prompts_of(model_input: Any) -> list[str]:
    """Prompts from a list of strings, a DataFrame with a `prompt` column, or a string array."""
    if isinstance(model_input, pd.DataFrame):
        if PROMPT not in model_input.columns:
            if len(model_input.columns) != 1:
                raise ValueError(f"expected a {PROMPT!r} column, got {list(model_input.columns)}")
            model_input = model_input.iloc[:, 0]
        else:
            model_input = model_input[PROMPT]
        values = model_input.tolist()
    elif isinstance(model_input, np.ndarray):
        values = model_input.reshape(-1).tolist()
    elif isinstance(model_input, str):
        values = [model_input]
    else:
        values = list(model_input)
    if not all(isinstance(v, str) for v in values):
        raise ValueError("prompts must be strings")
    return values


class PartiModel(PythonModel):
    """Prompts in, uint8 images (N, H, W, 3) out, sampled with the bundle's `TextToImage`."""

    def load_context(self, context) -> None:
        from parti_ops.model.config import SampleConfig
        from parti_ops.model.generate import TextToImage

        self.model = TextToImage.load(context.artifacts["bundle"])
        self.defaults = SampleConfig(**(context.model_config or {}).get("sample", {}))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        """uint8 images (N, H, W, 3) for N prompts; `params` override the sampling defaults."""
        # The signature's string column turns a list or an array into this DataFrame first;
        # a DataFrame hint is one MLflow infers no second schema from.
        import dataclasses

        settings = dataclasses.replace(self.defaults, **(params or {}))
        prompts = prompts_of(model_input)
        if not prompts:
            return np.zeros((0, *self.image_shape), dtype=np.uint8)
        return self.model(prompts, settings).numpy()

    @property
    def image_shape(self) -> tuple[int, int, int]:
        size = self.model.vqgan.image_size
        return (size, size, 3)


# Models from code: MLflow takes the model this file defines from `set_model`, the one
# statement that runs when the file is loaded. Nothing in the package imports this file.
set_model(PartiModel())
