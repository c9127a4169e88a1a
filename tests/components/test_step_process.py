"""What a step costs as a process of its own (each kfp step is one): its exit and imports."""

import os
import subprocess
import sys

CYCLE = """
import logging
logging.basicConfig(filename={path!r}, level=logging.INFO)
import parti_ops.components

class Cycle:
    def __del__(self):
        print("collected", flush=True)

cycle = Cycle()
cycle.me = cycle
del cycle
logging.getLogger("step").info("kept")
"""


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k != "_KFP_RUNTIME"}
    return subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True
    )


def test_a_kfp_step_process_skips_the_last_garbage_collection_but_keeps_its_log(tmp_path):
    plain, step = tmp_path / "plain.log", tmp_path / "step.log"
    outside = _python(CYCLE.format(path=str(plain)))
    inside = _python(CYCLE.format(path=str(step)), _KFP_RUNTIME="true")

    assert outside.returncode == inside.returncode == 0, outside.stderr + inside.stderr
    assert outside.stdout == "collected\n"  # the interpreter's last collection ran
    assert inside.stdout == ""  # skipped in a kfp step process
    assert plain.read_text() == step.read_text() == "INFO:step:kept\n"  # logs still flushed


def test_steps_that_need_no_torch_do_not_load_it():
    probe = _python(
        "import sys\n"
        "from parti_ops.components.serve import smoke_test_step\n"
        "from parti_ops.components.tokenizers import text_tokenizer_step\n"
        "from parti_ops.components.register import register_step\n"
        "import parti_ops.model.text_tokenizer\n"
        "print('torch' in sys.modules, 'torchmetrics' in sys.modules)"
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["False", "False"]
