"""``--config=configs/gpt_tiny.py``: the packaged ``jaxspeed.configs.gpt_tiny``.

Copy this file and override fields after ``get_config()`` to make your own.
"""

from jaxspeed.configs.gpt_tiny import get_config

__all__ = ["get_config"]
