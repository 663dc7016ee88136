r"""GLA on long-tailed data (Zhu et al., NeurIPS 2023): ImageNet-LT or Places-LT (the arg); the
zero-shot prior is estimated on the long-tailed training split, the fine-tuned model's prior is
its label frequency; many/medium/few-shot accuracy.

  glajax run configs/gla_longtail.py:imagenet_lt --workdir ~/runs/gla_imagenet_lt \
      # add data.manual_dir=... the first time (the split lists and images)
  glajax run configs/gla_longtail.py:runlocal --workdir /tmp/gla_lt
"""
from glajax.experiments import config as C

DATASETS = ("imagenet_lt", "places_lt")


def get_config(arg=None):
  args = C.parse_arg(arg, ("runlocal", *DATASETS))
  dataset = next((a for a in DATASETS if a in args), "imagenet_lt")
  config = C.base("gla")
  config.data.update(train=f"{dataset}@train", test=f"{dataset}@test", shifts=())
  config.train = C.recipe("finetune")
  config.gla = dict(shots=0, val_shots=0, long_tail=True, match_confidence=True,
                    prior_data="training")
  config.published.table = "gla"
  if "runlocal" in args:
    C.runlocal(config, train="train_lt", shifts=())
  return config
