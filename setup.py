"""Package discovery for effideploy's layout; everything else about the package is in pyproject.toml.

One import namespace spans the design card's top-level folders: effideploy/ is ``effideploy``, and exporters/,
runtimes/ and bench/ are ``effideploy.exporters``, ``effideploy.runtimes`` and ``effideploy.bench``. pyproject's
``[tool.setuptools.packages.find]`` cannot express that (it would find exporters/ as a top-level ``exporters``
package), and a hand-written package list goes stale: a wheel built from it lacked effideploy.search and
effideploy.quantization (issue 21). So every package under each folder is found here, subpackages included
(e.g. exporters/onnx/ is ``effideploy.exporters.onnx`` without touching this file); setuptools maps a
subpackage to its folder through the longest ``package_dir`` prefix. tests/test_packaging.py checks the wheel.
"""

from setuptools import find_packages, setup

PACKAGE_DIR = {
    "effideploy": "effideploy",
    "effideploy.exporters": "exporters",
    "effideploy.runtimes": "runtimes",
    "effideploy.bench": "bench",
}


def discover() -> list[str]:
    packages = []
    for package, folder in PACKAGE_DIR.items():
        packages.append(package)
        # Regular packages only (an __init__.py): data folders such as bench/policies/ are package data, not
        # packages; tests/test_packaging.py fails if a folder holding modules lacks its __init__.py.
        packages += [f"{package}.{sub}" for sub in find_packages(folder)]
    return sorted(set(packages))


setup(packages=discover(), package_dir=PACKAGE_DIR)
