"""Test set-up: 8 virtual CPU devices (for mesh tests), no network, quiet TensorFlow."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TFDS_DISABLE_GCS", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
