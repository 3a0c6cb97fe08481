"""The models layer: loading (Hub id, folder, GGUF), tokenizer helpers, inspection, the kit.

Nothing here imports from a layer above (engine, answers, experiments, edges).
"""
