"""``--config=configs/demo.py``: the packaged ``jaxspeed.configs.demo`` (``make demo``).

Copy this file and override fields after ``get_config()`` to make your own.
"""

from jaxspeed.configs.demo import get_config

__all__ = ["get_config"]
