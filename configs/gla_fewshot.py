r"""GLA few-shot (Zhu et al., NeurIPS 2023): prompt tuning on k = 1, 2, 4, 8, 16 shots per class
of one of CoOp's eleven transfer datasets, then the GLA ensemble. As the official GLA.FS code:
the prior is estimated on the zero-shot logits of the k training shots and the validation shots,
and the fine-tuned model's temperature is matched on the validation shots: k more shots of the
ImageNet training split, disjoint from the training shots (``generate_fewshot_train_val``);
min(k, 4) per class from the validation split of CoOp's other datasets (their
``datasets/*.py``; datasets without one of their own here: the training split, disjoint).
Zero-shot heads use GLA.FS's ``ENSEMBLE_TEMPLATES[dataset]`` and prompt tuning starts from
``CUSTOM_TEMPLATES[dataset]`` (``trainers/util.py``). The dataset is the arg, the shots an
override:

  glajax run configs/gla_fewshot.py:dtd,gla.shots=4 --workdir ~/runs/gla_dtd_4shot
  glajax run configs/gla_fewshot.py:vit_b16 --workdir ~/runs/gla_imagenet_vit
  glajax run configs/gla_fewshot.py:runlocal --workdir /tmp/gla_fewshot

The default is the setting of the published table, what ``scripts/gla.sh`` ran: OpenAI's RN50
(``C.OPENAI_RN50``, its open_clip-format copy) with ``gla.fewshot_recipe="rn50_ep50"``
(``rn50_ep50_shot{k}.yaml``: batch 32·k, lr 2e-5 / 4e-5 / 1e-4 / 2e-4 / 4e-4 for k = 1 / 2 / 4 /
8 / 16, 50 epochs) and ``gla.final_model="best_val"`` (the epoch of best GLA accuracy on the
validation shots). ``vit_b16``: OpenAI's ViT-B/16 with ``"vit_b16_ep50"``
(``vit_b16_ep50.yaml``: batch 32, lr 2e-3, the last epoch's model).
"""
from glajax.data import registry
from glajax.experiments import config as C

SHOTS = (1, 2, 4, 8, 16)
# Datasets whose registry entry has a validation split of its own (else: the training split).
VALIDATION = {"oxford_flowers102": "validation", "dtd": "validation", "fgvc_aircraft": "validation",
              "sun397": "validation"}


def get_config(arg=None):
  args = C.parse_arg(arg, ("runlocal", "vit_b16", *C.FEWSHOT_DATASETS))
  vit = "vit_b16" in args
  datasets = [a for a in args if a in C.FEWSHOT_DATASETS] or ["imagenet2012"]
  if len(datasets) > 1:
    raise C.bad_argument("config arg", "one dataset", datasets, C.ConfigError)
  dataset = datasets[0]
  config = C.base("gla")
  train = C.train_spec(dataset)
  config.data.update(
      train=train, test=C.test_spec(dataset),
      validation=f"{dataset}@{VALIDATION[dataset]}" if dataset in VALIDATION else train,
      shifts=C.IMAGENET_SHIFTS if dataset == "imagenet2012" else ())
  config.train = C.recipe("prompt_tuning")
  config.train.template = registry.gla_init_template(dataset)
  # Validation shots: gla.val_shots, or min(k, val_shots_max) (0: k, ImageNet's).
  config.gla = dict(shots=16, val_shots=0, val_shots_max=0 if dataset == "imagenet2012" else 4,
                    long_tail=False, match_confidence=True, prior_data="training",
                    templates="gla", fewshot_recipe="vit_b16_ep50" if vit else "rn50_ep50",
                    final_model="last_step" if vit else "best_val")
  if not vit:
    config.model.checkpoints = (C.OPENAI_RN50,)
  if dataset == "imagenet2012":  # the official readme's RN50 logs: GLA accuracy per k
    config.published.update(table="gla/fewshot_rn50_imagenet", rows=(("GLA", "{shots}"),))
  else:
    config.published.table = "gla"
  if "runlocal" in args:
    C.runlocal(config, shifts=(), tiny=C.TINY if vit else C.TINY + "-rn")
    config.data.validation = config.data.train
    config.gla.update(shots=1, templates="clip")
  return config
