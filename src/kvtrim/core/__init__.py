"""The bottom layer: the compression spec, selection arithmetic, figures, hooks, files and errors.

Nothing here imports torch models, transformers or any other kvtrim package.
"""
