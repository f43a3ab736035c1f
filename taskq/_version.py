"""taskq's version and the name of its distribution: the one place each is written.

``pyproject.toml`` reads ``__version__`` from here when the package is built
(``[tool.setuptools.dynamic]``); ``taskq.__version__`` and
``python -m taskq --version`` show it.
"""

#: The name to ``pip install``; the import package is ``taskq``.
DISTRIBUTION = "taskq-pg"

__version__ = "0.1.0"
