"""`python -m parti_ops.pipelines.cli ...`: the `parti` command without its script."""

from parti_ops.pipelines.cli import app

if __name__ == "__main__":
    app()
