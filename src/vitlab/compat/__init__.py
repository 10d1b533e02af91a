"""Compatibility layers: other libraries' model classes, with their constructor arguments, built from vitlab's
registered parts and families (:mod:`vitlab.compat.vit_pytorch`).  ``compat`` imports ``vitlab.models`` and
``vitlab.layers``; nothing in vitlab imports ``compat`` (``tests/test_imports.py``)."""
