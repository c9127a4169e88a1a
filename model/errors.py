"""The one base class of expected failures, at the bottom of the import graph.

Every stage's own error (ConfigError, IngestError, ExportError, ...) derives from
`PartiError` and keeps the builtin base it had (`ValueError`, `RuntimeError`), so callers
that catch the builtin still work. The `parti` command prints a `PartiError` as one red
line and exits 1; any other exception is a bug and keeps its traceback.

deploy/runtime.py does not use it: that file is copied alone into the Triton model folder,
where parti_ops is not installed.
"""


class PartiError(Exception):
    """An expected failure whose message says what to do; the CLI prints it as one red line."""


class ModelFolderError(PartiError, ValueError):
    """A model folder (a bundle, the Parti model, the image tokenizer) that is missing a part
    or cannot be read; the message names the folder and what to point at instead."""
