"""Helpers for the lessons: the U-shape and message figures (`figures`), loss and LoRA plots (`plots`), a graph
inspector (`inspect`), the split explorer (`explorer`) and the lab widget (`lab`).

The top layer: it may import every other part of splitkit, and nothing in splitkit imports it but the command line.
"""
