"""``--config=configs/rlhf_tiny.py``: the packaged ``jaxspeed.configs.rlhf_tiny``.

Copy this file and override fields after ``get_config()`` to make your own.
"""

from jaxspeed.configs.rlhf_tiny import get_config

__all__ = ["get_config"]
