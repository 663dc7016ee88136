r"""GLA on long-tailed data (Zhu et al., NeurIPS 2023): ImageNet-LT or Places-LT (the arg), the
fine-tuned model's prior is the training label frequency; many/medium/few-shot accuracy.

  glajax run configs/gla_longtail.py:imagenet_lt --workdir ~/runs/gla_imagenet_lt \
      # add data.manual_dir=... the first time (the split lists and images)
  glajax run configs/gla_longtail.py:runlocal --workdir /tmp/gla_lt
"""
from glajax.experiments import config as C
from glajax.train import recipes

DATASETS = ("imagenet_lt", "places_lt")


def get_config(arg=None):
  args = C.parse_arg(arg, ("runlocal", *DATASETS))
  dataset = next((a for a in DATASETS if a in args), "imagenet_lt")
  config = C.base("gla")
  config.data.update(train=dataset, eval=dataset, shifts=())
  config.train = recipes.finetune()
  config.train.total_steps = -1
  config.gla = dict(finetune="finetune", shots=0, long_tail=True, match_confidence=True,
                    prior_data=dataset)
  if "runlocal" in args:
    C.runlocal(config, train="train_lt", shifts=())
    config.gla.prior_data = f"{C.TINY_WORLD}@train_lt"
  return config
