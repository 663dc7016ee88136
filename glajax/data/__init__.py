"""Data layer: dataset registry, own TFDS builders, tf.data pipelines, index-level subsampling.

``registry.get(name)`` describes a dataset; ``pipeline.eval_batches`` / ``pipeline.train_batches``
stream CLIP-preprocessed batches; ``subsample`` selects long-tailed, k-shot and class-subset
index sets. ``registry``, ``subsample`` and ``builders`` do not import TensorFlow (the builders
import TFDS when they run); ``pipeline`` and ``preprocess`` do.
"""
