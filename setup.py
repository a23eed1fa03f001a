"""Only what pyproject.toml cannot say: kernels/ installs under the import name `rtdiff_kernels`
(a bare `kernels` is a PyPI package's name), beside the packages found under rtdiff_cluster/."""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["rtdiff_cluster*"]) + ["rtdiff_kernels"],
      package_dir={"rtdiff_kernels": "kernels"})
