"""The kernel: torch-only functions, the only copy of saebridge's math.

The SAE forward of every architecture (:mod:`.sae`), the sparse and blocked paths
(:mod:`.sparse`, :mod:`.blocked`), site layouts (:mod:`.layout`), activation-space
conversions as constants (:mod:`.spaces`), and splice / latent edits / steering /
transcoders as functions (:mod:`.ops`, :mod:`.indexing`). Its modules import only torch,
the standard library, each other and :mod:`saebridge.errors`, so the nnsight remote path
ships them by value to a server that has no saebridge. The ``SAE`` module, the
interventions, the torch-hook adapters, ``sb.trace`` and the remote worker all call them.
"""
