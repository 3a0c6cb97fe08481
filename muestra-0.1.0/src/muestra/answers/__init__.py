"""The answers layer: grammars (xgrammar), the think → answer phase controller, exact
answer probabilities, and the text/structured generators users call.

It builds on the engine (token ids only) and the models layer; nothing here imports
from experiments, analysis or the edges.
"""
