"""Qt front end. Talks to dupstudio.core only through functions taking progress + cancel, run on
one MLX worker thread (:mod:`dupstudio.gui.worker`)."""
from dupstudio.gui import qtfix as _qtfix  # noqa: F401  (PySide6 6.12 emit refcount workaround)
