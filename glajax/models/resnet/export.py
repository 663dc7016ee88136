"""The ResNet family's export: transformers' ``ResNetForImageClassification`` (``save_resnet``,
with its image processor) and a fine-tuned classifier as its own ``classifier`` with
``id2label``.

A supervised ResNet's classifier is a linear map on the raw pooled feature, which is exactly
``ResNetForImageClassification``'s ``classifier.1``: a glajax ``LinearHead(normalize=False)``
on ``encode_image`` exports as that layer, and ``pipeline("image-classification",
model=export)`` runs it without custom code. A head on normalised features has no place there
and is refused.
"""
from __future__ import annotations

from glajax.errors import bad_argument
from glajax.models.family import ExportInfo, LinearClassifier
from glajax.models.resnet.checkpoint import save_resnet


def save(model, directory, *, info: ExportInfo | None = None,
         classifier: LinearClassifier | None = None, extra_files: dict | None = None,
         overwrite: bool = False) -> str:
  """``save_resnet`` (its processor at ``info``'s image size when given) with ``classifier`` (a
  head on raw pooled features) as the exported model's classifier, ``id2label`` the class
  names of ``info``; one atomic write."""
  head, labels = None, None
  if classifier is not None:
    if info is None:
      raise bad_argument("info", "the class names of the classifier (an ExportInfo)", None)
    if classifier.normalize:
      raise bad_argument("classifier", "a head on raw pooled features (ResNetForImageClassifi"
                         "cation's classifier; LinearHead(normalize=False))",
                         "a head on L2-normalised features")
    head, labels = (classifier.kernel, classifier.bias), tuple(info.classnames)
  return save_resnet(model, directory, overwrite=overwrite, labels=labels, head=head,
                     image_size=None if info is None else info.image_size,
                     extra_files=extra_files)
