"""Backend adapters, installed as ``saebridge.adapters``: one module per backend.

Each module is the only place that knows its backend's API; importing one needs that
backend's optional package (``pip install 'saebridge[hf]'``, ``[tl]``, ``[nnsight]``).
"""
