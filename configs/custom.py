r"""Your own data in one command: fine-tune CLIP on a folder of images, sweep WiSE-FT's α and apply
GLA (kind ``own_data``), with one report of both.

  glajax run configs/custom.py:data.folder=~/data/pets --workdir ~/runs/pets
  glajax run configs/custom.py:data.folder=~/data/pets.csv,model.checkpoints=org/checkpoint \
    --workdir ~/runs/pets_csv
  glajax run configs/custom.py:runlocal,data.folder=~/data/pets --workdir /tmp/pets  # tiny, CPU

``data.folder`` is one of
  * ``<folder>/<class>/<image>``: one split; ``own_data.test_fraction`` (20 %) of every class is
    held out, seeded, as the test set, and neither fine-tuning nor GLA's prior sees it;
  * ``<folder>/train/<class>/<image>`` with ``test/`` (or ``val/``, ``validation/``) beside it:
    the last of those is the test set;
  * a CSV file (``.csv``) of ``path,label`` rows (paths relative to the CSV's folder; an optional
    ``path,label`` header; an optional third column ``train``/``val``/``test``).
Class names are the folder names (or labels), "_" read as a space, in the prompt
"a photo of a {}.". The images are prepared once into a TFDS copy under ``<workdir>/tfds``.
Without ``data.folder``, ``runlocal`` runs on the demo's tiny procedural world.
"""
from glajax.experiments import config as C


def get_config(arg=None):
  args = C.parse_arg(arg, ("runlocal",))
  config = C.base("own_data")
  config.data.folder = ""   # required unless runlocal: sets data.train and data.test
  # the checkpoint's own image size (config.json's vision_config.image_size), unless given
  config.data.update(train="", test="", shifts=(), image_size=None)
  # WiSE-FT's end-to-end recipe (AdamW, wd 0.1, cosine, grad clip 1) at a batch size a single
  # GPU holds, its learning rate scaled with the batch (3e-5 at 512), one epoch of warmup (the
  # recipe's 500 steps exceed a small dataset's whole run).
  config.train = C.recipe("finetune")
  config.train.batch_size = 128
  config.train.optimizer.update(learning_rate=1e-5, warmup_steps=0, warmup_epochs=1)
  config.wise_ft = dict(alphas=(0.0, 0.25, 0.5, 0.75, 1.0), export_alpha=0.5, ece_bins=15,
                        linear=False)
  config.gla = dict(shots=0, val_shots=0, long_tail=False, match_confidence=True,
                    prior_data="training")
  # Fitted to the data's size (kinds/own_data.py ``choose_recipe``): at least 300 steps (more
  # epochs on a small folder), and the learning rate among the recipe's and 10× and 100× it
  # that fine-tunes best on a 10 % per-class validation hold-out of the fine-tuning data (up to
  # two more steps of 10× while the largest wins: a small or weakly pre-trained model may need a
  # larger rate than ViT-B/16).
  config.own_data = dict(test_fraction=0.2, split_seed=0, learning_rates=(1e-5, 1e-4, 1e-3),
                         validation_fraction=0.1, min_steps=300, extensions=2)
  if "runlocal" in args:
    C.runlocal(config, shifts=())
    config.own_data.learning_rates = None   # runlocal's one learning rate, its 8 steps
  return config
