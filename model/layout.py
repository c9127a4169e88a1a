"""What the artifacts look like on disk: every folder and file name that more than one
stage reads or writes, in one place at the bottom of the import graph.

A step writes these names and the steps, exports and servers after it read them; none of
them imports another step's module to learn a file name. Nothing here imports anything.
"""

# A saved model (the text tokenizer aside, which is a transformers fast tokenizer folder).
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
MODEL_FILES = (WEIGHTS, CONFIG)  # a saved model's identity: the scorer's, the VQGAN's
IMAGE_TOKENIZER_FILES = MODEL_FILES
TEXT_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

# The trained bundle (the train step's output): Parti and the tokenizers its data was
# encoded with, each in its own folder, plus the training report and sample grid.
PARTI = "parti"
TEXT_TOKENIZER = "text_tokenizer"
IMAGE_TOKENIZER = "image_tokenizer"
TRAINING_REPORT = "training_report.json"
SAMPLES = "samples.png"

# Training state beside a model being trained (model/checkpoint.py writes the files).
CHECKPOINTS = "checkpoints"
# Left in the output folder by global rank 0 when the processes stopped on SIGTERM after
# writing a checkpoint: torchrun itself then exits 1, and the marker says it was a stop.
PREEMPTED = "preempted"
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what Kubernetes and torchrun read as "retry"
# The decoder's training entry point, which torchrun starts in every process
# (deploy/torchrun.py), on one machine and in each PyTorchJob pod.
TRAIN_ENTRY = "parti_ops.components.train_decoder"

# The ONNX export of a bundle (deploy/onnx.py writes it; deploy/triton.py serves it).
TEXT_ENCODER, DECODER_STEP, IMAGE_DECODER = "text_encoder", "decoder_step", "image_decoder"
GRAPHS = (TEXT_ENCODER, DECODER_STEP, IMAGE_DECODER)
ONNX_META = "meta.json"
INT8 = "int8"  # subfolder of the int8 variant, same file names
