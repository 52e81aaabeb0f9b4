"""``kvtrim serve``: an OpenAI-compatible server over the persistent context store.

``conversation`` cuts a prompt into its document and the rest, ``contexts`` finds or compresses a
document (memory, then :mod:`kvtrim.store`), ``decoding`` streams tokens after a cache,
``service`` runs one request, ``worker`` runs the model on one thread, ``app`` is the HTTP face.
"""
