"""Data layer: dataset registry, own TFDS builders, tf.data pipelines, index-level subsampling.

``registry.get(name)`` describes a dataset; ``pipeline.eval_batches`` / ``pipeline.train_batches``
stream CLIP-preprocessed batches; ``subsample`` selects long-tailed, k-shot and class-subset
index sets. Submodules import TensorFlow lazily, so importing ``glajax.data`` stays light.
"""
