"""What an export needs beyond the CLIP weights: the processor files and, for transformers users of
a ViT, the image classifier.

* :func:`processor_files`: the tokenizer's files and ``preprocessor_config.json`` (CLIP's resize,
  center crop, mean and std at the model's image size), so that
  ``transformers.CLIPProcessor.from_pretrained(export)`` works; written offline.
* :func:`classifier_export`: a fine-tuned classifier ``logits = normalise(f(x)) · K + b``
  (``LinearHead`` on projected features, ``CosineClassifier`` folded to K = s · normalise(W)ᵀ on
  pre-projection features) as a transformers image classifier with ``id2label``.

Why not transformers' own ``CLIPForImageClassification``: it computes
``Linear(mean_{patches} h_L)``, the mean of the last encoder layer's patch tokens, before
``post_layernorm``, with no projection and no normalisation; glajax's classifier reads the
post-LayerNorm CLS token, projects it and L2-normalises it. Neither the pooling (CLS vs. the mean
of the other tokens) nor the LayerNorm and normalisation (nonlinear) can be folded into its
linear head, and no other transformers image classifier has CLIP's ``pre_layrnorm``; any stock
class would give other predictions. So the export ships a 40-line subclass of
``CLIPPreTrainedModel`` (``glajax_clip_classifier.py``, registered through ``auto_map``) that
computes exactly glajax's function on the same weights, and a ``custom_pipelines`` entry so that
``pipeline("image-classification", model=export, trust_remote_code=True)`` runs it; without
``trust_remote_code`` transformers refuses the pipeline (it never silently runs another model).
"""
from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from glajax.errors import bad_argument
from glajax.models.clip.checkpoint import save_clip
from glajax.models.clip.modeling import MEAN, STD
from glajax.models.family import ExportInfo

CODE_FILE = "glajax_clip_classifier.py"
_MODEL_CLASS = "GlajaxCLIPForImageClassification"
_PIPELINE_CLASS = "GlajaxImageClassificationPipeline"


def preprocessor_config(image_size: int) -> dict:
  """transformers' ``CLIPImageProcessor`` settings for ``image_size``: bicubic resize of the
  short side, center crop, rescale to [0, 1], CLIP's mean and std (as OpenAI's checkpoints)."""
  if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
    raise bad_argument("image_size", "a positive int", repr(image_size))
  return {"image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor",
          "do_resize": True, "size": {"shortest_edge": image_size}, "resample": 3,
          "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
          "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
          "image_mean": list(MEAN), "image_std": list(STD), "do_convert_rgb": True}


def processor_files(tokenizer, image_size: int) -> dict[str, bytes]:
  """file name -> content: the tokenizer's own files (``save_pretrained`` of the transformers
  tokenizer inside glajax's ``Tokenizer``, offline) and ``preprocessor_config.json``."""
  hf_tokenizer = getattr(tokenizer, "_hf", None)
  if hf_tokenizer is None or not hasattr(hf_tokenizer, "save_pretrained"):
    raise bad_argument("tokenizer", "a glajax Tokenizer (glajax.load_tokenizer)",
                       type(tokenizer).__name__)
  files = {"preprocessor_config.json": json.dumps(preprocessor_config(image_size),
                                                  indent=2).encode()}
  with tempfile.TemporaryDirectory() as tmp:
    hf_tokenizer.save_pretrained(tmp)
    for name in sorted(os.listdir(tmp)):
      if os.path.isfile(os.path.join(tmp, name)):
        with open(os.path.join(tmp, name), "rb") as f:
          files[name] = f.read()
  if "tokenizer_config.json" in files:  # truncation at CLIP's context, as glajax tokenizes
    config = json.loads(files["tokenizer_config.json"])
    config["model_max_length"] = tokenizer.context_length
    files["tokenizer_config.json"] = json.dumps(config, indent=2).encode()
  return files


def classifier_export(kernel, bias, classnames, features: str):
  """(config.json entries, tensors for model.safetensors, files) exporting the classifier
  ``logits = normalise(f) · kernel + bias`` on ``features`` ("projected" or "pre_projection")."""
  kernel = np.asarray(kernel, np.float32)
  bias = np.asarray(bias, np.float32)
  classnames = [str(c) for c in classnames]
  if kernel.ndim != 2 or bias.shape != (kernel.shape[1],) or len(classnames) != kernel.shape[1]:
    raise bad_argument("kernel, bias, classnames", "(D, C), (C,) and C class names",
                       f"{kernel.shape}, {bias.shape} and {len(classnames)} names")
  if features not in ("projected", "pre_projection"):
    raise bad_argument("features", "'projected' or 'pre_projection'", repr(features))
  module = CODE_FILE[:-3]
  config = {
      "id2label": {str(i): name for i, name in enumerate(classnames)},
      "label2id": {name: i for i, name in enumerate(classnames)},
      "glajax_features": features,
      "auto_map": {"AutoModelForImageClassification": f"{module}.{_MODEL_CLASS}"},
      "custom_pipelines": {"image-classification": {
          "impl": f"{module}.{_PIPELINE_CLASS}", "pt": ["AutoModelForImageClassification"],
          "tf": [], "type": "image"}},
  }
  tensors = {"classifier.weight": np.ascontiguousarray(kernel.T), "classifier.bias": bias}
  return config, tensors, {CODE_FILE: CLASSIFIER_CODE}


def save(model, directory, *, info: ExportInfo | None = None, classifier=None,
         extra_files: dict | None = None, overwrite: bool = False) -> str:
  """The CLIP family's export, one atomic write: ``save_clip`` (a ViT in transformers format, a
  ResNet in open_clip's). With ``info`` the tokenizer's files, and for a ViT
  ``preprocessor_config.json`` (``CLIPProcessor``); with ``classifier`` (a
  ``family.LinearClassifier`` on normalised features) a ViT's image classifier for transformers
  (:func:`classifier_export`, class names from ``info``). open_clip has no image classifier: a
  ResNet's head stays in the files the caller adds (``head.npz``)."""
  files, config, tensors = dict(extra_files or {}), {}, {}
  resnet = model.config.resnet
  if info is not None:
    processor = processor_files(info.tokenizer, info.image_size)
    if resnet:
      processor.pop("preprocessor_config.json")
    files.update(processor)
  if classifier is not None and not resnet:
    if info is None:
      raise bad_argument("info", "the class names of the classifier (an ExportInfo)", None)
    if not classifier.normalize:
      raise bad_argument("classifier", "a head on normalised features (the exported "
                         "classifier normalises them)", "a head on raw features")
    config, tensors, code = classifier_export(*classifier[:2], info.classnames, classifier[2])
    files.update(code)
  return save_clip(model, directory, overwrite=overwrite, extra_files=files,
                   config_updates=config, extra_tensors=tensors)


CLASSIFIER_CODE = '''\
"""glajax's fine-tuned CLIP image classifier, for transformers (written by glajax's export).

logits = normalise(f(x)) @ classifier.weight.T + classifier.bias, with f(x) CLIP's pooled image
feature (post-LayerNorm CLS token), projected by visual_projection when config.glajax_features
is "projected": what glajax.models.heads.ImageClassifier computes. (transformers'
CLIPForImageClassification averages the patch tokens before post_layernorm, without projection
or normalisation: another function.)

  pipeline("image-classification", model=EXPORT, trust_remote_code=True)
"""
import torch
from torch import nn
from transformers import CLIPConfig, CLIPPreTrainedModel, ImageClassificationPipeline
from transformers.modeling_outputs import ImageClassifierOutput

try:  # transformers 4: CLIPModel.vision_model is a CLIPVisionTransformer
    from transformers.models.clip.modeling_clip import CLIPVisionTransformer

    def _vision_tower(config):
        return CLIPVisionTransformer(config)
except ImportError:  # transformers 5: a CLIPVisionModel holding the layers itself
    from transformers import CLIPVisionModel

    def _vision_tower(config):
        return CLIPVisionModel._from_config(config)


class GlajaxCLIPForImageClassification(CLIPPreTrainedModel):
    config_class = CLIPConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _keys_to_ignore_on_load_unexpected = [r"^text_model\\.", r"^text_projection\\.",
                                          r"^logit_scale"]

    def __init__(self, config):
        super().__init__(config)
        vision = config.vision_config
        self.features = getattr(config, "glajax_features", "projected")
        self.vision_model = _vision_tower(vision)  # as CLIPModel builds it: the same keys
        self.visual_projection = nn.Linear(vision.hidden_size, config.projection_dim, bias=False)
        width = config.projection_dim if self.features == "projected" else vision.hidden_size
        self.classifier = nn.Linear(width, config.num_labels)
        self.post_init()

    def forward(self, pixel_values=None, labels=None, **kwargs):
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output
        if self.features == "projected":
            pooled = self.visual_projection(pooled)
        logits = self.classifier(nn.functional.normalize(pooled, dim=-1))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return ImageClassifierOutput(loss=loss, logits=logits)


class GlajaxImageClassificationPipeline(ImageClassificationPipeline):
    """transformers' image-classification pipeline: named by the export's config so that the
    pipeline loads the class above (with trust_remote_code=True) and never another."""

    def check_model_type(self, supported_models):
        if type(self.model).__name__ != "GlajaxCLIPForImageClassification":
            super().check_model_type(supported_models)
'''
