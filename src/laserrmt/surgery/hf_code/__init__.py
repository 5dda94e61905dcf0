"""The modelling code written into a compressed folder, so that transformers loads it.

:mod:`.configuration_laserrmt` and :mod:`.modeling_laserrmt` are copied verbatim into every
folder whose ``config.json`` is marked ``"model_type": "laserrmt"`` and named in its
``auto_map``; ``AutoModel*.from_pretrained(folder, trust_remote_code=True)`` then builds the
base architecture with transformers' own classes and swaps in the compressed layers. Both files
import only torch and transformers: they must load where laserrmt is not installed.
"""
