"""Pretrained ImageNet models rebuilt in Keras 3, with weights loaded from installed packages."""
