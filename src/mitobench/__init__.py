"""mitobench: atypical vs normal mitotic figure classification under the AMi-Br protocol."""

__version__ = "0.1.0"

POSITIVE_CLASS = "Atypical"  # label 1 everywhere in mitobench (the reference code used Atypical=0)
