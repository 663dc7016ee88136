"""The data side against the official code: each recipe's transforms, GLA.FS's templates and
initial prompts, GLA's few-shot validation shots, per-shot recipe and small-set learning rate,
the backdoor paper's class names (Places-LT, iNaturalist-2018), CIFAR-LT subset, groups and LA
loss. The official constants and computations are ported here, each with its file."""
import json
import types

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from glajax.data import registry, subsample, transforms
from glajax.experiments import config as config_lib, roles
from glajax.experiments.kinds import backdoor, gla
from glajax.methods import logit_adjusted_loss
from glajax.train import losses, recipes

# --- transforms -------------------------------------------------------------------------------
# torchvision's arguments in the official code, at 224 (RandomResizedCrop's defaults: scale
# (0.08, 1.0), ratio (3/4, 4/3), BILINEAR).
_DEFAULT_RRC = dict(scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation="bilinear")
_OFFICIAL = {
    # mlfoundations/wise-ft clip/clip.py _transform(n_px, is_train): RandomResizedCrop(n_px,
    # scale=(0.9, 1.0), interpolation=Image.BICUBIC), no flip; Resize(n_px, BICUBIC), CenterCrop.
    "finetune": (dict(_DEFAULT_RRC, scale=(0.9, 1.0), interpolation="bicubic"), False,
                 (224, 224, "bicubic")),
    # wise-ft's linear classifier (src/models/finetune.py, freeze_encoder): features of the
    # val_preprocess images; its config is the end-to-end one's.
    "linear_probe": (dict(_DEFAULT_RRC, scale=(0.9, 1.0), interpolation="bicubic"), False,
                     (224, 224, "bicubic")),
    # MLAI-Yonsei/CaRot clip/clip.py _transform: the same.
    "flyp": (dict(_DEFAULT_RRC, scale=(0.9, 1.0), interpolation="bicubic"), False,
             (224, 224, "bicubic")),
    "carot": (dict(_DEFAULT_RRC, scale=(0.9, 1.0), interpolation="bicubic"), False,
              (224, 224, "bicubic")),
    # JiahaoChen1/Pre-train-Imbalance trainer.py build_data_loader (tte False):
    # RandomResizedCrop(resolution), RandomHorizontalFlip(); Resize(resolution * 8 // 7),
    # CenterCrop(resolution).
    "backdoor_peft": (dict(_DEFAULT_RRC), True, (224 * 8 // 7, 224, "bilinear")),
    # OSU-MLB/Fine-Tuning-Is-Fine-If-Calibrated releases no data code (py/data is absent); its
    # source weights are torchvision's, trained with references/classification presets.py:
    # RandomResizedCrop(224) + RandomHorizontalFlip(); Resize(256) + CenterCrop(224), bilinear.
    "finetune_sgd": (dict(_DEFAULT_RRC), True, (256, 224, "bilinear")),
    # Dassl transforms.py with GLA.FS configs/trainers/GLA/*.yaml INPUT (SIZE (224, 224),
    # INTERPOLATION bicubic, TRANSFORMS random_resized_crop, random_flip, normalize):
    # RandomResizedCrop(SIZE, interpolation=bicubic), RandomHorizontalFlip(); Resize(max(SIZE),
    # bicubic), CenterCrop(SIZE).
    "prompt_tuning": (dict(_DEFAULT_RRC, interpolation="bicubic"), True, (224, 224, "bicubic")),
}


def official_transforms(recipe: str):
  """(TrainTransform, EvalTransform) of the official code behind ``recipe``."""
  crop, flip, (resize, size, interpolation) = _OFFICIAL[recipe]
  return (transforms.TrainTransform(flip=flip, **crop),
          transforms.EvalTransform(resize=resize, crop=size, interpolation=interpolation))


@pytest.mark.parametrize("recipe", sorted(_OFFICIAL))
def test_each_recipe_declares_its_official_transforms(recipe):
  config = recipes.RECIPES[recipe](**({"num_classes": 100} if recipe == "backdoor_peft" else {}))
  assert transforms.of_config(config) == official_transforms(recipe)


def test_the_normalisation_is_clips():
  """Every official pipeline above normalises with CLIP's mean and std (e.g. wise-ft
  clip/clip.py Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258,
  0.27577711)); GLA.FS INPUT.PIXEL_MEAN / PIXEL_STD)."""
  assert transforms.CLIP_NORMALIZATION == ((0.48145466, 0.4578275, 0.40821073),
                                           (0.26862954, 0.26130258, 0.27577711))


# --- GLA.FS templates (BeierZhu/GLA GLA.FS.public.zip trainers/util.py) -----------------------
_CUSTOM_TEMPLATES = {
    "OxfordPets": "a type of pet, a photo of a {}.",
    "OxfordFlowers": "a type of flower, a photo of a {}.",
    "FGVCAircraft": "a type of aircraft, a photo of a {}",
    "DescribableTextures": "a texture of {}.",
    "EuroSAT": "a centered satellite photo of {}.",
    "StanfordCars": "a photo of a {}.",
    "Food101": "a type of food, a photo of {}.",
    "SUN397": "a photo of a {}.",
    "Caltech101": "a photo of a {}.",
    "UCF101": "a photo of a person doing {}.",
    "ImageNet": "a photo of a {}.",
}
_IMAGENET_TEMPLATES = [
    'a bad photo of a {}.', 'a photo of many {}.', 'a sculpture of a {}.',
    'a photo of the hard to see {}.', 'a low resolution photo of the {}.', 'a rendering of a {}.',
    'graffiti of a {}.', 'a bad photo of the {}.', 'a cropped photo of the {}.',
    'a tattoo of a {}.', 'the embroidered {}.', 'a photo of a hard to see {}.',
    'a bright photo of a {}.', 'a photo of a clean {}.', 'a photo of a dirty {}.',
    'a dark photo of the {}.', 'a drawing of a {}.', 'a photo of my {}.', 'the plastic {}.',
    'a photo of the cool {}.', 'a close-up photo of a {}.', 'a black and white photo of the {}.',
    'a painting of the {}.', 'a painting of a {}.', 'a pixelated photo of the {}.',
    'a sculpture of the {}.', 'a bright photo of the {}.', 'a cropped photo of a {}.',
    'a plastic {}.', 'a photo of the dirty {}.', 'a jpeg corrupted photo of a {}.',
    'a blurry photo of the {}.', 'a photo of the {}.', 'a good photo of the {}.',
    'a rendering of the {}.', 'a {} in a video game.', 'a photo of one {}.', 'a doodle of a {}.',
    'a close-up photo of the {}.', 'a photo of a {}.', 'the origami {}.',
    'the {} in a video game.', 'a sketch of a {}.', 'a doodle of the {}.', 'a origami {}.',
    'a low resolution photo of a {}.', 'the toy {}.', 'a rendition of the {}.',
    'a photo of the clean {}.', 'a photo of a large {}.', 'a rendition of a {}.',
    'a photo of a nice {}.', 'a photo of a weird {}.', 'a blurry photo of a {}.', 'a cartoon {}.',
    'art of a {}.', 'a sketch of the {}.', 'a embroidered {}.', 'a pixelated photo of a {}.',
    'itap of the {}.', 'a jpeg corrupted photo of the {}.', 'a good photo of a {}.',
    'a plushie {}.', 'a photo of the nice {}.', 'a photo of the small {}.',
    'a photo of the weird {}.', 'the cartoon {}.', 'art of the {}.', 'a drawing of the {}.',
    'a photo of the large {}.', 'a black and white photo of a {}.', 'the plushie {}.',
    'a dark photo of a {}.', 'itap of a {}.', 'graffiti of the {}.', 'a toy {}.',
    'itap of my {}.', 'a photo of a cool {}.', 'a photo of a small {}.', 'a tattoo of the {}.',
]
_ENSEMBLE_TEMPLATES = {
    "Caltech101": _IMAGENET_TEMPLATES,
    "ImageNet": _IMAGENET_TEMPLATES,
    "SUN397": _IMAGENET_TEMPLATES,
    "UCF101": [_CUSTOM_TEMPLATES["UCF101"]],
    "OxfordPets": [_CUSTOM_TEMPLATES["OxfordPets"]],
    "EuroSAT": [_CUSTOM_TEMPLATES["EuroSAT"]],
    "Food101": [_CUSTOM_TEMPLATES["Food101"]],
    "OxfordFlowers": [_CUSTOM_TEMPLATES["OxfordFlowers"]],
    "FGVCAircraft": ["a photo of a {}, a type of aircraft."],
    "DescribableTextures": ["{} texture."],
    "StanfordCars": ["a photo of a {}."],
}
# glajax's registry name -> DATASET.NAME (CoOp's datasets/*.py classes).
_COOP_NAMES = {"imagenet2012": "ImageNet", "caltech101": "Caltech101",
               "oxford_iiit_pet": "OxfordPets", "cars196": "StanfordCars",
               "oxford_flowers102": "OxfordFlowers", "food101": "Food101",
               "fgvc_aircraft": "FGVCAircraft", "sun397": "SUN397",
               "dtd": "DescribableTextures", "eurosat": "EuroSAT", "ucf101": "UCF101"}


def _official_prompt(dataset: str, classname: str) -> str:
  """trainers/gla.py PromptLearner: ctx_init = CUSTOM_TEMPLATES[name] without " {}." and with
  "_" as " ", prompt = ctx_init + " " + name + "." (class names with "_" as " ")."""
  ctx_init = _CUSTOM_TEMPLATES[dataset].replace(" {}.", "").replace("_", " ")
  return ctx_init + " " + classname.replace("_", " ") + "."


@pytest.mark.parametrize("name", sorted(_COOP_NAMES))
def test_gla_zero_shot_templates_and_initial_prompts_are_gla_fs(name):
  official = _COOP_NAMES[name]
  assert list(registry.templates(name, "gla")) == _ENSEMBLE_TEMPLATES[official]
  template = registry.gla_init_template(name)
  for classname in ("golden retriever", "banded", "AnnualCrop", "707-320"):
    if official == "FGVCAircraft":  # the official keeps a literal "{}": glajax its intent
      assert _official_prompt(official, classname) == (
          f"a type of aircraft, a photo of a {{}} {classname}.")
      assert template.format(classname) == f"a type of aircraft, a photo of a {classname}."
    else:
      assert template.format(classname) == _official_prompt(official, classname)


def test_gla_fewshot_config_uses_gla_fs_prompts():
  config = config_lib.load("gla_fewshot:dtd")
  assert config.train.template == "a texture of {}." and config.gla.templates == "gla"
  assert registry.templates("dtd") != registry.templates("dtd", "gla")  # CLIP's differ
  with pytest.raises(Exception, match="GLA's few-shot datasets"):
    registry.templates("cifar10", "gla")


# --- the backdoor paper's class names ---------------------------------------------------------
# Pre-train-Imbalance datasets/Places_LT/classnames.txt: the 75 names with "-" (of 365).
_PLACES_LT_DASHED = [
    'apartment_building-outdoor', 'arena-hockey', 'arena-performance', 'arena-rodeo',
    'athletic_field-outdoor', 'atrium-public', 'bakery-shop', 'balcony-exterior',
    'balcony-interior', 'basketball_court-indoor', 'bazaar-indoor', 'bazaar-outdoor',
    'booth-indoor', 'bow_window-indoor', 'bus_station-indoor', 'cabin-outdoor', 'canal-natural',
    'canal-urban', 'church-indoor', 'church-outdoor', 'desert-sand', 'desert-vegetation',
    'diner-outdoor', 'doorway-outdoor', 'elevator-door', 'escalator-indoor', 'field-cultivated',
    'field-wild', 'flea_market-indoor', 'florist_shop-indoor', 'forest-broadleaf',
    'garage-indoor', 'garage-outdoor', 'gazebo-exterior', 'general_store-indoor',
    'general_store-outdoor', 'greenhouse-indoor', 'greenhouse-outdoor', 'gymnasium-indoor',
    'hangar-indoor', 'hangar-outdoor', 'hotel-outdoor', 'hunting_lodge-outdoor',
    'ice_skating_rink-indoor', 'ice_skating_rink-outdoor', 'inn-outdoor', 'jacuzzi-indoor',
    'kennel-outdoor', 'lake-natural', 'library-indoor', 'library-outdoor', 'market-indoor',
    'market-outdoor', 'moat-water', 'mosque-outdoor', 'movie_theater-indoor', 'museum-indoor',
    'museum-outdoor', 'parking_garage-indoor', 'parking_garage-outdoor', 'pub-indoor',
    'shopping_mall-indoor', 'stadium-baseball', 'stadium-football', 'stadium-soccer',
    'stage-indoor', 'stage-outdoor', 'subway_station-platform', 'swimming_pool-indoor',
    'swimming_pool-outdoor', 'synagogue-outdoor', 'temple-asia', 'train_station-platform',
    'underwater-ocean_deep', 'volleyball_court-outdoor',
]


def test_places_lt_names_keep_the_dash_as_the_backdoor_code_does():
  """trainer.py get_tokenized_prompts: c.replace("_", " ") of classnames.txt's names; the other
  290 names agree with TFDS's Places365 label names (glajax's cleaning)."""
  names = registry.get("places_lt").classnames
  assert len(names) == 365 and len(_PLACES_LT_DASHED) == 75
  dashed = [n for n in names if "-" in n]
  assert dashed == [n.replace("_", " ") for n in _PLACES_LT_DASHED]
  assert "apartment building-outdoor" in names
  tfds_names = registry.get("places365").classnames
  for ours, theirs in zip(names, tfds_names):
    assert " ".join(ours.replace("-", " ").split()) == theirs


def _read_category_info(category_info, method="name"):
  """Pre-train-Imbalance datasets/inat2018.py iNaturalist2018.read_category_info."""
  id2cname = {}
  for id_, info in enumerate(category_info):
    id2cname[id_] = info[method]
  cnames_unique = sorted(set(id2cname.values()))
  cname2lab = {c: i for i, c in enumerate(cnames_unique)}
  return id2cname, cname2lab


def test_inaturalist_classes_are_species_names_labelled_by_sorted_name():
  """The species names of categories.json (its first entries checked against the official
  file), class c the c-th sorted name, stored label (category id) i -> cname2lab[id2cname[i]]."""
  from glajax.data import pipeline  # noqa  (TensorFlow: only for the relabelling)
  species = registry.assets.load_json("inaturalist2018_species.json")["names"]
  assert species[:3] == ["Hermodice carunculata", "Phragmatopoma californica",
                         "Eudistylia vancouveri"] and len(species) == 8142
  id2cname, cname2lab = _read_category_info([{"name": n} for n in species])
  info = registry.get("inaturalist2018")
  assert list(info.classnames) == sorted(cname2lab, key=cname2lab.get)
  stored = np.arange(8142)
  relabel = pipeline._relabel(info)  # pylint: disable=protected-access
  np.testing.assert_array_equal(relabel(stored).numpy(),
                                [cname2lab[id2cname[i]] for i in stored])
  assert info.classnames[relabel(0).numpy()] == "Hermodice carunculata"


def test_inaturalist_order_on_a_generated_categories_file(tmp_path):
  """The same port on a small generated categories.json whose names are out of order."""
  categories = [{"id": i, "name": n} for i, n in enumerate(["Zea mays", "Abies alba",
                                                            "Mus musculus", "Canis lupus"])]
  path = tmp_path / "categories.json"
  path.write_text(json.dumps(categories))
  id2cname, cname2lab = _read_category_info(json.loads(path.read_text()))
  names, stored = registry.sorted_names([c["name"] for c in categories])
  assert list(names) == sorted(cname2lab, key=cname2lab.get)
  assert [names.index(id2cname[i]) for i in range(4)] == [cname2lab[id2cname[i]] for i in range(4)]
  assert [stored.index(i) for i in range(4)] == [cname2lab[id2cname[i]] for i in range(4)]


# --- GLA few-shot: validation shots, per-shot recipe, small-set learning rate -----------------
# Validation shots per dataset file: GLA.FS datasets/imagenet.py generate_fewshot_train_val
# (2k drawn, k train + k val, from the training split); CoOp datasets/*.py
# generate_fewshot_dataset(val, num_shots=min(num_shots, 4)) for the other ten.
def _official_val_shots(name, k):
  return k if name == "imagenet2012" else min(k, 4)


@pytest.mark.parametrize("name", sorted(_COOP_NAMES))
def test_gla_validation_shots_are_the_dataset_files(name):
  for k in (1, 2, 4, 8, 16):
    config = config_lib.load(f"gla_fewshot:{name},gla.shots={k}")
    uses = roles.by_purpose(gla.plan(config))
    train, val = uses["fine-tuning"].ref, uses["validation"].ref
    sizes = val.steps[-1].params[0]
    val_k = sizes[val.steps[-1].part]
    assert val_k == _official_val_shots(name, k)
    assert train.steps[-1].params[0][0] == k
    if name == "imagenet2012":  # drawn from the training split, disjoint from the train shots
      assert val.split == train.split and roles.disjoint(train, val)


# GLA.FS configs/trainers/GLA/rn50_ep50_shot{k}.yaml: DATALOADER.TRAIN_X.BATCH_SIZE, OPTIM.LR,
# OPTIM.MAX_EPOCH (the rest as vit_b16_ep50.yaml: sgd, cosine, 1 constant warmup epoch at 1e-5).
_RN50_EP50 = {1: (32, 0.00002, 50), 2: (64, 0.00004, 50), 4: (128, 0.0001, 50),
              8: (256, 0.0002, 50), 16: (512, 0.0004, 50)}


def _fake_exp(spec):
  config = config_lib.load(spec)
  return types.SimpleNamespace(
      config=config, train_config=lambda: config.train.copy_and_resolve_references(),
      num_classes=lambda ref: registry.get(ref.dataset).num_classes)


@pytest.mark.parametrize("shots", sorted(_RN50_EP50))
def test_per_shot_recipe_is_rn50_ep50_shot_k(shots):
  exp = _fake_exp(f"gla_fewshot:imagenet2012,gla.shots={shots},gla.fewshot_recipe=rn50_ep50")
  train = gla.train_config(exp)
  assert (train.batch_size, train.optimizer.learning_rate, train.epochs) == _RN50_EP50[shots]
  vit = recipes.prompt_tuning()
  for key in ("name", "momentum", "weight_decay", "warmup_epochs", "warmup", "warmup_lr",
              "schedule"):
    assert train.optimizer[key] == vit.optimizer[key]
  assert (vit.batch_size, vit.optimizer.learning_rate, vit.epochs) == (32, 0.002, 50)
  default = gla.train_config(_fake_exp(f"gla_fewshot:imagenet2012,gla.shots={shots}"))
  assert (default.batch_size, default.optimizer.learning_rate,
          default.epochs) == _RN50_EP50[shots]   # the published setting by default
  vit_b16 = gla.train_config(_fake_exp(f"gla_fewshot:imagenet2012,vit_b16,gla.shots={shots}"))
  assert (vit_b16.batch_size, vit_b16.optimizer.learning_rate) == (32, 0.002)  # vit_b16_ep50


def _official_small_set_lr(lr, batch_size, num_classes, num_shots):
  """GLA.FS trainers/gla.py build_model: num_train = len(classnames) * NUM_SHOTS; if num_train <
  batch_size: LR = LR * (batch_size / num_train)."""
  num_train = num_classes * num_shots
  if num_train < batch_size:
    lr = lr * (batch_size / num_train)
  return lr


@pytest.mark.parametrize("recipe", ["vit_b16_ep50", "rn50_ep50"])
def test_small_training_sets_scale_the_learning_rate_as_gla_py(recipe):
  for shots in (1, 2, 4, 8, 16):
    exp = _fake_exp(f"gla_fewshot:eurosat,gla.shots={shots},gla.fewshot_recipe={recipe}")
    base = recipes.prompt_tuning() if recipe == "vit_b16_ep50" else \
        recipes.prompt_tuning_for_shots(recipes.prompt_tuning(), shots)
    train = gla.train_config(exp)
    assert train.optimizer.learning_rate == pytest.approx(_official_small_set_lr(
        base.optimizer.learning_rate, base.batch_size, 10, shots), rel=1e-12)
    # Dassl's loader: one batch of all N examples per epoch when N < batch (no drop_last); on
    # d devices the largest multiple of d not above N
    n, d = 10 * shots, jax.device_count()
    assert train.batch_size == min(base.batch_size, n - n % d if n >= d else n)
    one = recipes.scale_for_small_set(recipes.prompt_tuning(), 10)
    assert one.batch_size == 10 and recipes.scale_for_small_set(
        recipes.prompt_tuning(), 10, devices=8).batch_size == 8


# --- backdoor: CIFAR-100-LT subset and groups, LA loss (Pre-train-Imbalance) ------------------


def _official_cifar_lt(targets, imb_factor, rand_number=0):
  """datasets/cifar100.py IMBALANCECIFAR100: np.random.seed, get_img_num_per_cls,
  gen_imbalanced_data; returns the kept positions (in the data's order) and the counts."""
  cls_num = 100
  np.random.seed(rand_number)
  img_max = len(targets) / cls_num
  img_num_per_cls = [int(img_max * (imb_factor ** (c / (cls_num - 1.0)))) for c in range(cls_num)]
  targets_np = np.array(targets, dtype=np.int64)
  kept = []
  for the_class, the_img_num in zip(np.unique(targets_np), img_num_per_cls):
    idx = np.where(targets_np == the_class)[0]
    np.random.shuffle(idx)
    kept.append(idx[:the_img_num])
  return np.concatenate(kept), img_num_per_cls


@pytest.mark.parametrize("ratio,imb_factor", [(10, 0.1), (50, 0.02), (100, 0.01)])
def test_cifar_lt_subset_is_the_official_draw(ratio, imb_factor):
  """CIFAR-100's 50 000 training labels in the files' order, stored shuffled (as TFDS does):
  glajax's subset of the stored rows, mapped to file positions, is exactly the official one."""
  source = np.random.default_rng(5).permutation(np.repeat(np.arange(100), 500))
  stored_to_source = np.random.default_rng(6).permutation(len(source))  # stored row -> position
  stored = source[stored_to_source]
  official, counts = _official_cifar_lt(source, imb_factor)
  ours = subsample.long_tail_indices(stored, ratio, seed=0, order=stored_to_source)
  np.testing.assert_array_equal(np.sort(stored_to_source[ours]), np.sort(official))
  np.testing.assert_array_equal(subsample.long_tail_counts(100, 500.0, ratio), counts)
  unordered = subsample.long_tail_indices(source, ratio, seed=0)  # rows already in file order
  np.testing.assert_array_equal(unordered, np.sort(official))


def test_cifar_groups_use_ir100_counts_as_trainer_py():
  """trainer.py: for CIFAR100, _IR10 and _IR50 the many (> 100) / medium / few (< 20) classes
  come from CIFAR100_IR100's cls_num_list."""
  _, ir100 = _official_cifar_lt(np.repeat(np.arange(100), 500), 0.01)
  split = np.array(ir100)
  official = ((split > 100).nonzero()[0], ((split >= 20) & (split <= 100)).nonzero()[0],
              (split < 20).nonzero()[0])
  for ratio in (10, 50, 100):
    config = config_lib.load(f"backdoor:cifar100_lt,backdoor.imbalance_ratio={ratio}")
    exp = types.SimpleNamespace(config=config,
                                split_labels=lambda ref: np.repeat(np.arange(100), 500))
    counts = np.asarray(_official_cifar_lt(np.repeat(np.arange(100), 500), 1 / ratio)[1])
    groups = backdoor.group_counts(exp, counts)
    ours = ((groups > 100).nonzero()[0], ((groups >= 20) & (groups <= 100)).nonzero()[0],
            (groups < 20).nonzero()[0])
    for a, b in zip(ours, official):
      np.testing.assert_array_equal(a, b)
  other = config_lib.load("backdoor:places_lt")
  assert other.backdoor.group_imbalance_ratio == 0  # its own training counts


class _LogitAdjustedLoss(torch.nn.Module):
  """Pre-train-Imbalance models/utils/losses.py (the cls_num_list branch)."""

  def __init__(self, cls_num_list, tau=1.0, factor=1.):
    super().__init__()
    cls_num_ratio = cls_num_list / torch.sum(cls_num_list)
    self.log_cls_num = torch.log(cls_num_ratio + 1e-9)
    self.tau, self.factor = tau, factor

  def forward(self, logit, target):
    logit_adjusted = logit + self.tau * self.log_cls_num.unsqueeze(0)
    return F.cross_entropy(logit_adjusted * self.factor, target)


def test_la_loss_matches_the_official_with_its_epsilon():
  """Float32, atol 1e-6, under jit; a class without examples gets log(1e-9), not -inf."""
  import jax  # noqa  (the loss is jitted)
  rng = np.random.default_rng(0)
  counts = np.array([500, 120, 31, 7, 1, 0], np.float32)
  logits = rng.normal(size=(64, 6)).astype(np.float32) * 3
  labels = rng.integers(0, 5, 64).astype(np.int32)
  official = _LogitAdjustedLoss(torch.tensor(counts))(torch.tensor(logits),
                                                       torch.tensor(labels).long()).item()
  log_prior = losses.la_log_prior(counts)
  np.testing.assert_allclose(log_prior, _LogitAdjustedLoss(torch.tensor(counts)).log_cls_num,
                             rtol=0, atol=1e-6)
  ours = jax.jit(logit_adjusted_loss)(logits, labels, log_prior, 1.0)
  np.testing.assert_allclose(float(ours), official, rtol=0, atol=1e-6)
  assert np.isfinite(log_prior).all()
  config = recipes.backdoor_peft(6, 12)
  assert config.tau == 1.0


def test_backdoor_evaluates_and_initialises_its_head_in_float32():
  """Pre-train-Imbalance ``trainer.py``: fp16 autocast in training only; the head's text features
  and evaluation in float32. glajax's recipe computes in float32 throughout (training more
  precise than fp16), the same for evaluation and the head's initialisation."""
  config = recipes.backdoor_peft(num_classes=100)
  assert config.model.dtype == "float32"
  assert recipes.prompt_tuning().model.dtype == "bfloat16"   # GLA.FS: an fp16 prompt learner
