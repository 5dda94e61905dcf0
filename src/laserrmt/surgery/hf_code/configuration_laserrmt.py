"""The configuration of a folder compressed by laserrmt (written by laserrmt; needs only transformers).

``config.json`` holds the base model's configuration with ``"model_type": "laserrmt"`` (a type
transformers does not know, so the folder is refused without ``trust_remote_code``), the base
type under ``laserrmt_base_model_type`` and the compressed layers under ``laserrmt_modules``
(module name → ``{"type": class name, "config": constructor settings}``).
"""

from __future__ import annotations

from typing import Any

import transformers

BASE_MODEL_TYPE_KEY = "laserrmt_base_model_type"


class LaserRMTConfig(transformers.PretrainedConfig):
    """The base configuration's values, kept as plain attributes, and the compressed layers."""

    model_type = "laserrmt"

    def __init__(self, **kwargs: Any) -> None:
        self.laserrmt_modules: dict[str, Any] = kwargs.pop("laserrmt_modules", {})
        super().__init__(**kwargs)

    def base_config(self) -> Any:
        """The base architecture's own config class, filled from this one."""
        data = self.to_dict()
        base_type = data.pop(BASE_MODEL_TYPE_KEY, None)
        if base_type not in transformers.CONFIG_MAPPING:
            raise ValueError(
                f"config.json names base model type {base_type!r}, unknown to transformers "
                f"{transformers.__version__}; upgrade transformers"
            )
        data["model_type"] = base_type
        return transformers.CONFIG_MAPPING[base_type].from_dict(data)
