"""Torchvision detector builders and the parts distillation needs from them."""
