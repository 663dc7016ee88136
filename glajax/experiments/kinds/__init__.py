"""The experiment kinds: one module each.

A kind is found by its name: the module ``glajax.experiments.kinds.<name>`` (every module here
but ``common`` is one; no table lists them). Each has ``NAME``, ``FIELDS`` (its config keys as
``glajax.schema.Field``s, dotted from the config's root; ``check(config)`` for what spans keys;
``train_sections(config)`` when it trains with sections other than ``train``), ``plan(config) ->
[roles.Use]`` (every array it will use, with its role, declared before any work) and ``run(exp)
-> common.Outcome`` (results, tables and plots: ``report`` dataclasses). Heavy passes go through the
experiment's caches (logits, fine-tuning runs); everything after them is a pure method of
``glajax.methods`` on cached logits. (The table below describes them; nothing reads it.)

==============  =================================================================  ===========
kind            what runs                                                          paper
==============  =================================================================  ===========
wise_ft         zero-shot head, fine-tuning (end-to-end or head only), α sweep     Wortsman 22
gla             prior estimation, fine-tuning or prompt tuning, GLA ensemble       Zhu 23
backdoor        adapters + cosine classifier + LA loss per backbone, Σ_m z_m       Chen 25
absent_class    fine-tuning on seen classes, ALG / PCV / oracle γ, AUSUC           Mai 24
contrastive     FLYP or CaRot (the recipe named), accuracy and ECE under shift     Goyal 23, Oh 24
own_data        fine-tuning on a folder or CSV, WiSE-FT's α sweep and GLA on it    Wortsman, Zhu
compose         each robust fine-tuning recipe, then WiSE-FT, T, GLA, γ in turn    all five
==============  =================================================================  ===========
"""
from __future__ import annotations

import importlib
import pkgutil

from glajax.errors import ConfigError, bad_argument

_NOT_KINDS = ("common",)


def names() -> tuple[str, ...]:
  """Every kind's name: the modules of this package (but ``common``)."""
  return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__)
                      if m.name not in _NOT_KINDS and not m.name.startswith("_")))


def get(name):
  """The kind module named ``name``, or a ConfigError naming ``experiment``."""
  if not isinstance(name, str) or name not in names():
    raise bad_argument("experiment", f"one of {', '.join(names())}", repr(name), ConfigError)
  return importlib.import_module(f"{__name__}.{name}")


KINDS = {name: get(name) for name in names()}
