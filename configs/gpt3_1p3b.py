"""``--config=configs/gpt3_1p3b.py``: the packaged ``jaxspeed.configs.gpt3_1p3b``.

Copy this file and override fields after ``get_config()`` to make your own.
"""

from jaxspeed.configs.gpt3_1p3b import get_config

__all__ = ["get_config"]
