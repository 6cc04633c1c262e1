"""Code shared by the task scripts: data, model files, face preprocessing, metrics, training loop."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter out of task output
