"""The experiment kinds: one module each, the one source of truth for kind names (``KINDS``).

Each module has ``NAME``, ``plan(config) -> [roles.Use]`` (every array it will use, with its
role, declared before any work) and ``run(exp) -> {"results", "tables", "plots"}`` (plots are
``report`` dataclasses). Heavy passes go through the experiment's caches (logits, fine-tuning
runs); everything after them is a pure method of ``glajax.methods`` on cached logits.

==============  =================================================================  ===========
kind            what runs                                                          paper
==============  =================================================================  ===========
wise_ft         zero-shot head, fine-tuning (end-to-end or head only), α sweep     Wortsman 22
gla             prior estimation, fine-tuning or prompt tuning, GLA ensemble       Zhu 23
backdoor        adapters + cosine classifier + LA loss per backbone, Σ_m z_m       Chen 25
absent_class    fine-tuning on seen classes, ALG / PCV / oracle γ, AUSUC           Mai 24
contrastive     FLYP or CaRot (the recipe named), accuracy and ECE under shift     Goyal 23, Oh 24
own_data        fine-tuning on a folder or CSV, WiSE-FT's α sweep and GLA on it    Wortsman, Zhu
==============  =================================================================  ===========
"""
from glajax.experiments.kinds import absent_class, backdoor, contrastive, gla, own_data, wise_ft

KINDS = {module.NAME: module for module in (wise_ft, gla, backdoor, absent_class, contrastive,
                                            own_data)}
