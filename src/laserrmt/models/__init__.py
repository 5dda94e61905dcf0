"""Models: loading (:mod:`.loading`), target discovery (:mod:`.targets`) and the naming
conventions of model families (:mod:`.architectures`).

Import from the submodules (``from laserrmt.models.targets import find_targets``); this package
re-exports nothing so that importing it stays cheap.
"""
