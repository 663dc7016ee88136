r"""GLA few-shot (Zhu et al., NeurIPS 2023): prompt tuning on k = 1, 2, 4, 8, 16 shots per class
of one of CoOp's eleven transfer datasets, then the GLA ensemble (z_ft divided by a temperature
matched to its accuracy). The prior and the temperature are estimated on the k-shot training
examples, the only labelled data of a few-shot task. The dataset is the arg, the shots an override:

  glajax run configs/gla_fewshot.py:dtd,gla.shots=4 --workdir ~/runs/gla_dtd_4shot
  glajax run configs/gla_fewshot.py:runlocal --workdir /tmp/gla_fewshot
"""
from glajax.experiments import config as C
from glajax.train import recipes

SHOTS = (1, 2, 4, 8, 16)


def get_config(arg=None):
  args = C.parse_arg(arg, ("runlocal", *C.FEWSHOT_DATASETS))
  datasets = [a for a in args if a in C.FEWSHOT_DATASETS] or ["imagenet2012"]
  if len(datasets) > 1:
    raise C.bad_argument("config arg", "one dataset", datasets, C.ConfigError)
  dataset = datasets[0]
  config = C.base("gla")
  config.data.update(train=dataset, eval=dataset,
                     shifts=C.IMAGENET_SHIFTS if dataset == "imagenet2012" else ())
  config.train = recipes.prompt_tuning()
  config.train.total_steps = -1
  config.gla = dict(finetune="prompt_tuning", shots=16, long_tail=False, match_confidence=True,
                    prior_data=C.SHOTS)
  if "runlocal" in args:
    C.runlocal(config, shifts=())
    config.gla.update(shots=1)
  return config
