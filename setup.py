"""Packaging that pyproject.toml cannot say: the wheel ships the top-level ``configs/`` folder as
``glajax/configs`` (pyproject's ``packages.find`` cannot be combined with a renamed folder).
``glajax.experiments.config.configs_dir()`` finds that copy in an install and ``configs/`` in a
checkout. A model family's tests (``glajax/models/<family>/tests``) stay out of the wheel.
Everything else is in pyproject.toml."""
from setuptools import find_namespace_packages, setup

setup(packages=find_namespace_packages(include=["glajax", "glajax.*"],
                                       exclude=["*.__pycache__", "*.tests"]) + ["glajax.configs"],
      package_dir={"glajax.configs": "configs"})
